"""`attnlab inspect`: a trained language model's attention pathways — heatmaps per layer and head, per-head
statistics (entropy, previous-token score, induction score, KV-shift coefficients) and a report that names the
previous-token and induction heads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass
class Config:
    ckpt: str = ""
    """a run folder (its latest checkpoint) or one checkpoint folder (required)"""
    text: str = ""
    """text whose attention maps are drawn (space-separated token ids for runs without a tokenizer); empty: the
    first repeated random sequence"""
    out: str = ""
    """output folder; default RUN/inspect"""
    layers: str = "all"
    """layers to draw and report: all, first:N, last:N, odd, even or 0,1"""
    heads: str = "all"
    """heads to draw and report: all or a list like 0,2"""
    batch: int = 16
    """repeated random sequences the statistics average over"""
    half: int = 0
    """length of each sequence's random half (the sequence is it twice); 0: min(64, max_seq_len // 2)"""
    prev_threshold: float = 0.4
    """a head whose previous-token score reaches this is named a previous-token head"""
    induction_threshold: float = 0.3
    """a head whose induction score reaches this is named an induction head"""
    max_plot_tokens: int = 48
    """token labels on the heatmap axes up to this many tokens (numbers beyond)"""
    seed: int = 0
    """seed of the random sequences"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N"""

    def __post_init__(self):
        if self.batch < 1:
            raise UserError(f"batch must be at least 1, got {self.batch}")
        if self.half < 0:
            raise UserError(f"half must be >= 0 (0: automatic), got {self.half}")


def select_heads(spec: str, n_head: int) -> list[int]:
    s = str(spec).strip().lower()
    if s == "all":
        return list(range(n_head))
    try:
        out = sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"bad head selection {spec!r}: use all or a list like 0,2") from None
    bad = [h for h in out if not 0 <= h < n_head]
    if bad or not out:
        raise UserError(f"head selection {spec!r} names heads {bad or 'none'} but the model has {n_head} "
                        f"(0..{n_head - 1})")
    return out


def _text_ids(cfg: Config, run, max_len: int) -> list[int] | None:
    if not cfg.text:
        return None
    if run.tokenizer is not None:
        ids = run.tokenizer.encode(cfg.text)
    else:
        try:
            ids = [int(t) for t in cfg.text.split()]
        except ValueError:
            raise UserError("this run has no tokenizer: give --text as space-separated token ids") from None
        vocab = run.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise UserError(f"token ids in --text must lie in 0..{vocab - 1}")
    if not ids:
        raise UserError("--text encodes to no tokens")
    if len(ids) > max_len:
        raise UserError(f"--text is {len(ids)} tokens, longer than the model's context of {max_len}")
    return ids


def _labels(run, ids: list[int]) -> list[str]:
    if run.tokenizer is None:
        return [str(t) for t in ids]
    return [run.tokenizer.decode([t]).replace("\n", "\\n") or "·" for t in ids]


def draw_layer(path: Path, p, heads: list[int], labels: list[str], layer: int, max_tokens: int) -> Path:
    """One PNG: a grid of the chosen heads' attention maps of one sequence (rows: queries, columns: keys)."""
    from ..report import figure

    n = p.shape[-1]
    cols = min(4, len(heads))
    rows = (len(heads) + cols - 1) // cols
    cell = 3.6 if n <= max_tokens else 3.0

    def draw(fig, plt):
        for a, h in enumerate(heads):
            ax = fig.add_subplot(rows, cols, a + 1)
            im = ax.imshow(p[h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer} head {h}", fontsize=10)
            tokens = n <= max_tokens
            ax.set_xlabel("key token" if tokens else "key position", fontsize=8)
            ax.set_ylabel("query token" if tokens else "query position", fontsize=8)
            if tokens:
                ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
                ax.set_yticks(range(n), labels, fontsize=6)
            else:
                ax.tick_params(labelsize=7)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
        fig.suptitle(f"layer {layer}: attention probability (row = query, column = key)", fontsize=10)

    return figure(path, draw, size=(cell * cols + 1.2, cell * rows + 0.3))


def main(cfg: Config) -> dict:
    import torch

    from ..attention.registry import select_layers
    from ..report import Report
    from ..run.inspect import (
        attention_maps,
        head_scores,
        repeated_random_tokens,
        shift_coefficients,
    )
    from ..run.load import load_run
    from ..training.device import resolve_device

    if not cfg.ckpt:
        raise UserError("--ckpt is required")
    run = load_run(cfg.ckpt)
    if run.kind != "lm":
        raise UserError(f"inspect reads language-model runs; {cfg.ckpt} is a {run.kind!r} run")
    model = run.model
    mcfg = model.cfg
    n_layer, n_head, ctx = mcfg.n_layer, mcfg.n_head, mcfg.max_seq_len
    layers = select_layers(cfg.layers, n_layer)
    if not layers:
        raise UserError("--layers selects no layer")
    heads = select_heads(cfg.heads, n_head)
    half = cfg.half or min(64, ctx // 2)
    if 2 * half > ctx:
        raise UserError(f"--half {half} makes sequences of {2 * half} tokens, longer than the context of {ctx}")
    text_ids = _text_ids(cfg, run, ctx)
    device, _ = resolve_device(cfg.device, "float32")
    model.to(device).eval()
    out = Path(cfg.out) if cfg.out else run.run_dir / "inspect"
    out.mkdir(parents=True, exist_ok=True)

    rep_idx = repeated_random_tokens(mcfg.vocab_size, half, cfg.batch, cfg.seed)
    maps = attention_maps(model, rep_idx.to(device))
    rows = [r for r in head_scores(maps, rep_idx) if r["layer"] in layers and r["head"] in heads]
    if text_ids is not None:
        tmaps = attention_maps(model, torch.tensor([text_ids], device=device))
        trows = {(r["layer"], r["head"]): r for r in head_scores(tmaps, torch.tensor([text_ids]))}
        for r in rows:
            t = trows[(r["layer"], r["head"])]
            r["text_entropy"], r["text_prev_token"] = t["entropy"], t["prev_token"]
        draw_maps, draw_ids = [m[0] for m in tmaps], text_ids
    else:
        draw_maps, draw_ids = [m[0] for m in maps], rep_idx[0].tolist()
    labels = _labels(run, draw_ids)
    pngs = [draw_layer(out / f"attention_layer{li}.png", draw_maps[li], heads, labels, li, cfg.max_plot_tokens)
            for li in layers]
    shifts = [r for r in shift_coefficients(model) if r["layer"] in layers]

    prev_heads = [(r["layer"], r["head"]) for r in rows if r["prev_token"] >= cfg.prev_threshold]
    ind_heads = [(r["layer"], r["head"]) for r in rows if r["induction"] >= cfg.induction_threshold]
    report = Report(out)
    report.h(f"Attention pathways of {run.ckpt}", 1)
    report.p(f"{n_layer} layers × {n_head} heads, context {ctx}. Statistics over {cfg.batch} repeated random "
             f"sequences (two copies of {half} uniform tokens from the model's {mcfg.vocab_size}), seed {cfg.seed}. "
             "Maps are softmax(q·kᵀ/√d) of each layer's own q and k with the causal mask.")

    def name(hs):
        return ", ".join(f"layer {a} head {b}" for a, b in hs) or "none"

    report.p(f"**Previous-token heads** (previous-token score ≥ {cfg.prev_threshold}): {name(prev_heads)}")
    report.p(f"**Induction heads** (induction score ≥ {cfg.induction_threshold}): {name(ind_heads)}")
    report.p("entropy: mean attention entropy in nats; prev_token: mean attention of query i on key i−1; "
             "induction: mean attention on the token after the previous occurrence of the query's token.")
    report.table(rows)
    report.csv("stats.csv", rows)
    if shifts:
        report.h("KV-shift coefficients")
        report.table(shifts)
        report.csv("kv_shift.csv", shifts)
    report.h("Attention maps")
    report.p("Sequence drawn: " + ("--text" if text_ids is not None else "the first repeated random sequence"))
    for png in pngs:
        report.p(f"![{png.stem}]({png.name})")
    report.save()
    result = {"out": str(out), "previous_token_heads": prev_heads, "induction_heads": ind_heads,
              "stats": rows, "kv_shift": shifts}
    print(json.dumps({k: v for k, v in result.items() if k != "stats"}, indent=2))
    return result
