"""`attnlab run adapt`: does brief fine-tuning with efficient attention in place recover its perplexity gap on a
pretrained model, beyond what the same fine-tune gives the unpatched model?

The LevAttention finding (Kannan et al. 2024: a model trained with leverage-score attention in place does
much better than one that meets it only at inference), tried on a real pretrained LM: HyperAttention, plain and
with each key pre-scoring method, patched into the last layers of the model (SmolLM2-135M from its GGUF, say),
also with KV shifting retrofitted at identity. For every variant v:

  E0   held-out perplexity of the pretrained model, its own attention
  P0   the same model with v patched in                                  gap0 = P0 − E0
  then LoRA fine-tuning for S steps on the user's corpus:
  E1   the model fine-tuned WITHOUT the mechanism, own attention (the same for every v)
  Pe   that model with v patched in       (plain fine-tuning, i.e. domain adaptation alone)
  Pm   the model fine-tuned WITH v in place, evaluated with v
  Em   that model with its own attention  (does adapting to v cost exact attention anything?)

recovered = 1 − (Pm − E1) / gap0 is the share of the patched-vs-exact gap closed by fine-tuning with the
mechanism, measured against the exact model after the same fine-tune; recovered_plain = 1 − (Pe − E1) / gap0
is what plain fine-tuning closes; beyond = recovered − recovered_plain.

Training uses short windows (`train_context`); evaluation uses `eval_context`, where the approximation is
active (the hyper options must make it active at both: min_seq_len below train_context).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError, require_file
from ..run.experiment import ExperimentConfig, experiment

PRESCORES = ["none", "kmeans", "kmedian", "leverage", "norm"]
QUICK_HYPER = {"min_seq_len": 32, "block_size": 16, "sample_size": 16, "lsh_bits": 3, "top_k": 8}


@dataclass
class AdaptConfig(ExperimentConfig):
    out: str = "runs/adapt"
    """output folder (must not hold an earlier run)"""
    model: str = ""
    """a local transformers checkpoint folder or .gguf file (required)"""
    gguf_file: str | None = None
    """a GGUF file to load instead (a path, or a name inside --model)"""
    data: str = ""
    """the corpus to fine-tune on (required); its last --val_fraction is the held-out text unless --eval_data"""
    eval_data: str | None = None
    """a separate held-out text file (default: the tail of --data)"""
    val_fraction: float = 0.1
    """share of --data held out when there is no --eval_data"""
    layers: str = "last:8"
    """where the mechanism goes"""
    hyper: dict = field(default_factory=lambda: {"min_seq_len": 128, "block_size": 64, "sample_size": 64,
                                                 "top_k": 64})
    """hyper options shared by every variant; they must approximate at --train_context (block + sample + top_k
    below half of it), which is checked"""
    prescores: list[str] = field(default_factory=lambda: ["none", "kmeans", "leverage"])
    """pre-scoring methods (none: plain hyper)"""
    kv_shift: list[str] = field(default_factory=lambda: ["none"])
    """pre-scoring methods for which hyper + KV shifting (retrofitted at identity) is tried as well"""
    eval_context: int = 2048
    """tokens per held-out window"""
    eval_windows: int = 2
    """held-out windows"""
    train_context: int = 512
    """tokens per training window"""
    batch_size: int = 1
    """training windows per step"""
    steps: int = 20
    """LoRA steps per fine-tune"""
    lr: float = 1e-3
    """peak learning rate"""
    lora_r: int = 8
    """LoRA rank"""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    """linear layers that get adapters"""
    lora_layers: str = "mechanism"
    """decoder layers that get adapters: mechanism (the layers in --layers; the backward pass then stops
    there), all, last:N, ..."""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass"""
    bf16: bool = False
    """bf16 autocast in training and evaluation"""


def _sized(cfg: AdaptConfig) -> AdaptConfig:
    """--quick: a few minutes on a tiny model (CI), two variants and one of them with KV shifting."""
    if not cfg.quick:
        return cfg
    return dataclasses.replace(cfg, hyper=dict(QUICK_HYPER), prescores=cfg.prescores[:2], kv_shift=cfg.kv_shift[:1],
                               eval_context=min(cfg.eval_context, 256), eval_windows=1, train_context=128, steps=2,
                               batch_size=2)


def variants(cfg: AdaptConfig) -> list[tuple[str, dict, str | None]]:
    """(label, hyper options, transform) of every mechanism tried."""
    bad = sorted((set(cfg.prescores) | set(cfg.kv_shift)) - set(PRESCORES))
    if bad:
        raise UserError(f"unknown pre-scoring method(s) {', '.join(bad)}; choose from {', '.join(PRESCORES)}")
    out = []
    for p in cfg.prescores:
        out.append(("hyper" if p == "none" else f"hyper+{p}", {**cfg.hyper, "prescore": p}, None))
    for p in cfg.kv_shift:
        out.append(("hyper" + ("" if p == "none" else f"+{p}") + " +kv_shift", {**cfg.hyper, "prescore": p},
                    "kv_shift"))
    return out


@experiment("adapt", AdaptConfig)
def adapt(cfg: AdaptConfig, ctx) -> dict:
    """LoRA fine-tuning with hyper (each pre-scoring, ± KV shifting) in place, against plain fine-tuning"""
    from ..attention.hyper import HyperConfig
    from ..integrations.hf import patch_model, unpatch_model
    from ..integrations.hf_finetune import (FinetuneConfig, heldout_nll, heldout_windows, install, token_split,
                                            train, unwrap, wrap_for_training)
    from ..integrations.hf_load import load_pretrained
    from ..integrations.hf_transform import remove_transform

    cfg = _sized(cfg)
    if not (cfg.model or cfg.gguf_file) or not cfg.data:
        raise UserError("adapt needs --model (a transformers folder or .gguf file) and --data (a text corpus)")
    vs = variants(cfg)
    for label, opts, _ in vs:
        _check_active(label, HyperConfig(**opts), cfg.train_context)
    tok, model = load_pretrained(cfg.model or None, cfg.gguf_file, device=ctx.device)
    train_ids, val_ids = token_split(tok, Path(cfg.data), 0.0 if cfg.eval_data else cfg.val_fraction,
                                     cfg.train_context)
    if cfg.eval_data:
        text = require_file(cfg.eval_data, "eval data file").read_text(encoding="utf-8", errors="replace")
        val_ids = torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    held = heldout_windows(val_ids, cfg.eval_context, cfg.eval_windows)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    log, t0 = [], time.time()

    lora_layers = cfg.layers if cfg.lora_layers == "mechanism" else cfg.lora_layers

    def ft_config(attention, options, transform):
        return FinetuneConfig(attention=attention, options=options, layers=cfg.layers, transform=transform,
                              method="lora", lora_r=cfg.lora_r, lora_alpha=2.0 * cfg.lora_r,
                              lora_targets=cfg.lora_targets, lora_layers=lora_layers, context=cfg.train_context,
                              batch_size=cfg.batch_size,
                              steps=cfg.steps, lr=cfg.lr, warmup=max(1, cfg.steps // 10), seed=cfg.seed,
                              gradient_checkpointing=cfg.gradient_checkpointing, bf16=cfg.bf16, progress=False,
                              save=False)

    def ppl(note):
        r = heldout_nll(model, held, 1, cfg.bf16, cfg.seed)
        log.append({"what": note, "perplexity": r["perplexity"], "nll": r["nll"], "t": round(time.time() - t0, 1)})
        print(f"[adapt {time.time() - t0:6.0f}s] {note}: perplexity {r['perplexity']:.4f}", flush=True)
        return r["perplexity"]

    def fine_tune(fc):
        nonlocal model
        install(model, fc)
        trainee = wrap_for_training(model, fc)
        stats = train(trainee, train_ids, fc, ctx.device)
        model = unwrap(trainee)
        return stats

    def reset():
        remove_transform(model)
        unpatch_model(model)
        model.load_state_dict(original)

    def patched_ppl(note):
        """Perplexity with each distinct hyper option set patched in (a transform at identity changes
        nothing, so a variant that differs only by one shares the number)."""
        out, done = {}, {}
        for label, opts, _ in vs:
            key = json.dumps(opts, sort_keys=True)
            if key not in done:
                patch_model(model, "hyper", opts, cfg.layers)
                done[key] = ppl(f"{note}, {label}")
                unpatch_model(model)
            out[label] = done[key]
        return out

    e0 = ppl("pretrained, own attention")
    p0 = patched_ppl("pretrained")
    # Plain fine-tuning: the domain-adaptation baseline every variant is measured against.
    plain = fine_tune(ft_config("none", {}, None))
    e1 = ppl("fine-tuned without the mechanism, own attention")
    pe = patched_ppl("fine-tuned without the mechanism")
    reset()
    rows, trains = [], [{"variant": "plain (no mechanism)", **_train_row(plain)}]
    for label, opts, transform in vs:
        stats = fine_tune(ft_config("hyper", opts, transform))
        pm = ppl(f"fine-tuned with {label}, {label}")
        unpatch_model(model)
        em = ppl(f"fine-tuned with {label}, own attention")
        reset()
        gap0 = p0[label] - e0
        rec = 1 - (pm - e1) / gap0 if gap0 else float("nan")
        rec_plain = 1 - (pe[label] - e1) / gap0 if gap0 else float("nan")
        rows.append({"variant": label, "E0": e0, "P0": p0[label], "gap0_pct": 100 * gap0 / e0, "E1": e1,
                     "Pe": pe[label], "Pm": pm, "Em": em, "recovered": rec, "recovered_plain": rec_plain,
                     "beyond": rec - rec_plain})
        trains.append({"variant": label, **_train_row(stats)})
    _write(ctx, cfg, rows, trains, log)
    best = max(rows, key=lambda r: r["beyond"]) if rows else None
    return {"rows": rows, "train": trains, "best_beyond": best and {"variant": best["variant"],
                                                                     "beyond": best["beyond"]}}


def _check_active(label: str, h, context: int) -> None:
    """Refuse options under which hyper is exact at the training context: the causal recursion's largest
    rectangle has context/2 keys, and a query there sees its block, the pre-scored keys and the sample."""
    keys = context // 2
    seen = h.block_size + h.sample_size + (h.top_k if h.prescore != "none" else 0)
    if context <= h.min_seq_len or keys <= h.block_size or seen >= keys:
        raise UserError(f"{label} is exact at --train_context {context} (min_seq_len {h.min_seq_len}; a query of "
                        f"the largest {keys}-key rectangle sees {min(seen, keys)} keys): fine-tuning would never meet "
                        "the approximation; raise --train_context or lower min_seq_len, block_size, sample_size, top_k")


def _train_row(stats: dict) -> dict:
    return {"steps": stats["steps_done"], "seconds": stats["seconds"], "tokens_per_second": stats["tokens_per_second"],
            "loss_first": stats["loss_first"], "loss_last_10pct": stats["loss_last_10pct"]}


def _write(ctx, cfg, rows, trains, log):
    rep = ctx.report
    rep.csv("adapt.csv", rows)
    rep.csv("train.csv", trains)
    rep.jsonl("log.jsonl", log)
    rep.h("Fine-tuning with efficient attention in place", 1)
    rep.p(f"{cfg.gguf_file or cfg.model}, mechanism in layers {cfg.layers}, hyper options {cfg.hyper}. Held-out: "
          f"{cfg.eval_windows} window(s) of {cfg.eval_context} tokens; LoRA r={cfg.lora_r} on {cfg.lora_targets} "
          f"in layers {cfg.lora_layers}, "
          f"{cfg.steps} steps of {cfg.batch_size}x{cfg.train_context} tokens, lr {cfg.lr}, on {cfg.data}. "
          "E0/P0: pretrained, own attention / patched; E1/Pe: fine-tuned without the mechanism, own attention / "
          "patched; Pm/Em: fine-tuned with it, patched / own attention. recovered = 1 - (Pm - E1)/(P0 - E0); "
          "recovered_plain = 1 - (Pe - E1)/(P0 - E0); beyond = recovered - recovered_plain. Perplexities are e-based.")
    rep.table(rows, ["variant", "E0", "P0", "gap0_pct", "E1", "Pe", "Pm", "Em", "recovered", "recovered_plain",
                     "beyond"], fmt="{:.3f}")
    rep.h("Training", 2)
    rep.table(trains, ["variant", "steps", "seconds", "tokens_per_second", "loss_first", "loss_last_10pct"],
              fmt="{:.3f}")
    if rows:
        from ..report import figure

        def draw(fig, plt):
            ax = fig.add_subplot(1, 1, 1)
            xs = range(len(rows))
            ax.bar([x - 0.2 for x in xs], [r["recovered_plain"] for r in rows], 0.4, label="plain fine-tune")
            ax.bar([x + 0.2 for x in xs], [r["recovered"] for r in rows], 0.4, label="fine-tuned with it")
            ax.set_xticks(list(xs), [r["variant"] for r in rows], rotation=15, fontsize=8)
            ax.set_ylabel("share of the perplexity gap recovered")
            ax.axhline(0, color="black", linewidth=0.5)
            ax.legend(fontsize=8)

        rep.image(figure(ctx.out / "recovered.png", draw), "share of the patched-vs-exact gap recovered")
    rep.save()


# ----------------------------------------------------------------------------------------------------------
# The inference side on the same model: hyper (each pre-scoring) in the last n layers, prefix computed once.


@dataclass
class HFLayersConfig(ExperimentConfig):
    out: str = "runs/hf-layers"
    """output folder (must not hold an earlier run)"""
    model: str = ""
    """a local transformers checkpoint folder or .gguf file (required)"""
    gguf_file: str | None = None
    """a GGUF file to load instead (a path, or a name inside --model)"""
    data: str = ""
    """text file to score (required)"""
    context: int = 8192
    """tokens per window"""
    windows: int = 1
    """windows scored"""
    last: list[int] = field(default_factory=lambda: [4, 8, 16])
    """patch the last n layers, for each n"""
    hyper: dict = field(default_factory=dict)
    """hyper options shared by every variant"""
    prescores: list[str] = field(default_factory=lambda: list(PRESCORES))
    """pre-scoring methods (none: plain hyper)"""


@experiment("hf-layers", HFLayersConfig, kind="benchmark")
def hf_layers(cfg: HFLayersConfig, ctx) -> dict:
    """perplexity and tail time of hyper (each pre-scoring) in the last n layers of a real model, shared prefix"""
    from ..integrations.hf import patch_model, unpatch_model
    from ..integrations.hf_eval import token_windows
    from ..integrations.hf_load import load_pretrained
    from ..integrations.hf_tail import boundary_states, check_tail, decoder_layers, nll, tail_logits

    if not (cfg.model or cfg.gguf_file) or not cfg.data:
        raise UserError("hf-layers needs --model (a transformers folder or .gguf file) and --data (a text file)")
    bad = sorted(set(cfg.prescores) - set(PRESCORES))
    if bad:
        raise UserError(f"unknown pre-scoring method(s) {', '.join(bad)}; choose from {', '.join(PRESCORES)}")
    tok, model = load_pretrained(cfg.model or None, cfg.gguf_file, device=ctx.device)
    n_layer = len(decoder_layers(model))
    if not cfg.last or min(cfg.last) < 1 or max(cfg.last) > n_layer:
        raise UserError(f"--last must name layer counts between 1 and {n_layer}")
    windows = token_windows(tok, Path(cfg.data), cfg.context, cfg.windows)
    firsts = {n: n_layer - n for n in cfg.last}
    check_tail(model, windows[:1].to(ctx.device), min(firsts.values()))
    variants = [("exact", {}, "exact")] + [("hyper", {**cfg.hyper, "prescore": p}, "hyper" if p == "none"
                                            else f"hyper+{p}") for p in cfg.prescores]
    acc: dict[tuple, dict] = {}
    t0 = time.time()
    for w in range(len(windows)):
        ids = windows[w : w + 1].to(ctx.device)
        logits, seen, full_s = boundary_states(model, ids, list(firsts.values()))
        base = nll(logits, ids)
        del logits
        for n, first in firsts.items():
            _, tail_u = tail_logits(model, seen[first], first)
            for name, opts, label in variants:
                patch_model(model, name, opts, f"last:{n}")
                lg, tail_p = tail_logits(model, seen[first], first)
                unpatch_model(model)
                a = acc.setdefault((n, label), {"base": 0.0, "patched": 0.0, "tail_u": 0.0, "tail_p": 0.0,
                                                "full": 0.0})
                a["base"] += base
                a["patched"] += nll(lg, ids)
                a["tail_u"] += tail_u
                a["tail_p"] += tail_p
                a["full"] += full_s
                print(f"[hf-layers {time.time() - t0:6.0f}s] window {w} last {n} {label}: nll {nll(lg, ids):.4f} "
                      f"(unpatched {base:.4f}), tail {tail_p:.1f}s vs {tail_u:.1f}s", flush=True)
                del lg
    import math

    k = len(windows)
    rows = []
    for (n, label), a in acc.items():
        pu, pp = math.exp(a["base"] / k), math.exp(a["patched"] / k)
        rows.append({"last": n, "variant": label, "ppl_unpatched": pu, "ppl_patched": pp,
                     "gap_pct": 100 * (pp / pu - 1), "tail_s_unpatched": a["tail_u"] / k,
                     "tail_s_patched": a["tail_p"] / k, "tail_ratio": a["tail_p"] / a["tail_u"],
                     "model_s_estimate_ratio": (a["full"] - a["tail_u"] + a["tail_p"]) / a["full"]})
    rep = ctx.report
    rep.csv("layers.csv", rows)
    rep.h("HyperAttention and pre-scoring in the last layers of a pretrained model", 1)
    rep.p(f"{cfg.gguf_file or cfg.model} on {cfg.data}: {k} window(s) of {cfg.context} tokens, {ctx.device}; hyper "
          f"options {cfg.hyper or 'defaults'}. Perplexities e-based. The first N - n layers run once per window "
          "(unpatched); each variant runs its last n layers on their output. tail_ratio: patched over unpatched "
          "time of those n layers and the head; model_s_estimate_ratio: the whole forward, prefix included.")
    rep.table(rows, ["last", "variant", "ppl_unpatched", "ppl_patched", "gap_pct", "tail_s_unpatched",
                     "tail_s_patched", "tail_ratio", "model_s_estimate_ratio"], fmt="{:.3f}")
    rep.save()
    return {"rows": rows}
