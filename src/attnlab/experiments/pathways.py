"""Pathway pruning at inference: how many attention connections does a trained model need?

Two models of the same size are trained on a text corpus, one with dense attention and one with SSA (a subset
of keys per query in training, so it may learn to rely on fewer pathways); two more, likewise, on the
induction task. Each is then evaluated with the `prune` kernel swapped into every layer: each query keeps its
top-k highest-scoring connections (a fraction of its visible keys) and renormalises; random pruning at the same
fractions is the control. Reported: validation loss (text) and induction accuracy against the kept fraction,
and the smallest fraction at which each model stays within `tolerance` of its full-attention loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..attention.swap import swapped_attention
from ..errors import UserError
from ..inference.ensemble import evaluate_lm
from ..report import line_plot
from ..run.config import DataConfig, RunConfig, lm_run, with_attention
from ..run.experiment import ExperimentConfig, experiment
from ..training.device import autocast

METHODS = ("topk", "random", "topp")


@dataclass
class PathwaysConfig(ExperimentConfig):
    data: str = ""
    """a text file or folder (required)"""
    seq_len: int = 256
    """tokens per training sequence (the model's context)"""
    n_layer: int = 4
    """number of Transformer layers of the text models"""
    n_head: int = 4
    """attention heads per layer"""
    d_model: int = 128
    """model width"""
    batch_size: int = 16
    """sequences per training step"""
    steps: int = 1500
    """training steps of each text model"""
    lr: float = 2e-3
    """peak learning rate (AdamW, cosine decay to lr/10)"""
    warmup_steps: int = 100
    """linear learning-rate warm-up steps"""
    factor: int = 4
    """SSA's S for the SSA-trained models"""
    sampling: str = "local"
    """SSA sampling of the SSA-trained models: local or unbiased"""
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0])
    """kept fractions of each query's visible keys (topk, random) or kept probability mass (topp)"""
    methods: list[str] = field(default_factory=lambda: ["topk", "random"])
    """pruning methods: topk, random (the control), topp"""
    tolerance: float = 0.01
    """'stays within' threshold: relative increase of the validation loss over full attention"""
    eval_batches: int = 8
    """validation windows: eval_batches × batch_size × seq_len tokens"""
    induction: bool = True
    """also train dense and SSA models on the induction task and prune them"""
    induction_layers: int = 1
    """layers of the induction models"""
    induction_transform: str = "kv_shift"
    """k/v transform of the induction models: kv_shift learns the task in one layer; none (vanilla attention)
    needs two layers and did not learn it in 8000 steps here, which leaves nothing to prune"""
    induction_vocab: int = 64
    """vocabulary of the induction task"""
    induction_seq_len: int = 128
    """sequence length of the induction task"""
    induction_steps: int = 1500
    """training steps of each induction model"""


def text_base(cfg: PathwaysConfig, data: DataConfig) -> RunConfig:
    return lm_run(vocab_size=256, n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model, seq_len=cfg.seq_len,
                  batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                  eval_every=max(50, cfg.steps // 5), seed=cfg.seed, data=data)


def induction_base(cfg: PathwaysConfig) -> RunConfig:
    run = lm_run(vocab_size=cfg.induction_vocab, n_layer=cfg.induction_layers, n_head=cfg.n_head,
                 d_model=cfg.d_model, seq_len=cfg.induction_seq_len, batch_size=cfg.batch_size,
                 steps=cfg.induction_steps, lr=1e-3, warmup_steps=cfg.warmup_steps,
                 eval_every=max(50, cfg.induction_steps // 5), seed=cfg.seed,
                 data=DataConfig(source="induction", eval_batches=cfg.eval_batches))
    return with_attention(run, transform=cfg.induction_transform)


def ssa_variant(run: RunConfig, cfg: PathwaysConfig) -> RunConfig:
    return with_attention(run, name="ssa", options={"factor": cfg.factor, "sampling": cfg.sampling})


def prune_curve(model, batches, fractions, methods, seed, device, amp) -> list[dict]:
    """Loss and accuracy of `model` on `batches` with every layer's kernel swapped for `prune` at each
    (method, fraction)."""
    rows = []
    for method in methods:
        for f in fractions:
            with swapped_attention(model, "prune", {"method": method, "keep": f, "seed": seed}), \
                    autocast(device, amp):
                m = evaluate_lm(model, batches, mode="auto", device=device)
            rows.append({"method": method, "keep": f, "loss": m["loss"], "accuracy": m["accuracy"]})
    return rows


def smallest_within(rows: list[dict], full: float, tolerance: float) -> float | None:
    """The smallest kept fraction from which on (it and every larger one) the loss stays within `tolerance`
    of `full`; None if even the largest does not."""
    best = None
    for r in sorted(rows, key=lambda r: -r["keep"]):
        if r["loss"] > full * (1 + tolerance):
            break
        best = r["keep"]
    return best


def _check(cfg: PathwaysConfig) -> None:
    if not cfg.fractions or any(not 0 < f <= 1 for f in cfg.fractions):
        raise UserError("fractions must be in (0, 1]")
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise UserError(f"unknown pruning method(s) {bad}; choose from {', '.join(METHODS)}")
    if cfg.sampling not in ("local", "unbiased") or cfg.factor < 1:
        raise UserError("sampling must be local or unbiased and factor at least 1")
    if cfg.tolerance < 0:
        raise UserError("tolerance must be >= 0")
    from ..attention.registry import transforms

    if cfg.induction_layers < 1 or cfg.induction_transform not in {"none", *transforms()}:
        raise UserError(f"induction_layers must be >= 1 and induction_transform one of none, "
                        f"{', '.join(transforms())}")


@experiment("pathways", PathwaysConfig, "pathway pruning: loss and induction accuracy against the kept fraction "
                                          "of attention connections, dense- vs SSA-trained, top-k vs random")
def run(cfg: PathwaysConfig, ctx) -> dict:
    if cfg.quick:
        cfg = replace(cfg, seq_len=min(cfg.seq_len, 64), n_layer=min(cfg.n_layer, 2), d_model=min(cfg.d_model, 32),
                      n_head=min(cfg.n_head, 2), batch_size=min(cfg.batch_size, 4), steps=min(cfg.steps, 20),
                      warmup_steps=5, eval_batches=min(cfg.eval_batches, 2), fractions=[0.1, 0.5, 1.0],
                      induction_seq_len=min(cfg.induction_seq_len, 32), induction_vocab=min(cfg.induction_vocab, 16),
                      induction_steps=min(cfg.induction_steps, 20))
    _check(cfg)
    fractions = sorted(set(cfg.fractions) | {1.0})
    data, tok, corpus = ctx.text(cfg.data, eval_batches=cfg.eval_batches)
    eval_set = list(corpus.eval_windows("val", cfg.seq_len, cfg.batch_size, max_batches=cfg.eval_batches))
    if not eval_set:
        raise UserError(f"the validation split of {cfg.data} is shorter than one window of {cfg.seq_len}")

    rows, train_rows = [], []
    plans = [("text", "dense", text_base(cfg, data)), ("text", "ssa", ssa_variant(text_base(cfg, data), cfg))]
    if cfg.induction:
        ind = induction_base(cfg)
        plans += [("induction", "dense", ind), ("induction", "ssa", ssa_variant(ind, cfg))]
    for task_name, trained, run_cfg in plans:
        name = f"{task_name}-{trained}"
        print(f"== {name}", flush=True)
        corp = corpus if task_name == "text" else None
        model, task, res = ctx.train(run_cfg, name, corpus=corp, tokenizer=tok if corp else None, record=True)
        model.eval()
        batches = eval_set if task_name == "text" else list(task.eval_batches())
        curve = prune_curve(model, batches, fractions, cfg.methods, cfg.seed, ctx.device, ctx.amp)
        for r in curve:
            rows.append({"task": task_name, "trained": trained, **r})
        train_rows.append({"task": task_name, "trained": trained, "steps": res.steps, "step_s": res.step_s})
        print("   " + ", ".join(f"{r['method']}@{r['keep']:g} {r['loss']:.4f}" for r in curve), flush=True)
    return _write(cfg, ctx, rows, train_rows, fractions)


def _write(cfg, ctx, rows, train_rows, fractions) -> dict:
    ctx.report.csv("pruning.csv", rows)
    ctx.report.csv("runs.csv", train_rows)
    summary_rows = []
    for task_name in ("text", "induction"):
        for trained in ("dense", "ssa"):
            sel = [r for r in rows if r["task"] == task_name and r["trained"] == trained]
            if not sel:
                continue
            full = next(r["loss"] for r in sel if r["keep"] == 1.0 and r["method"] == "topk") if any(
                r["method"] == "topk" for r in sel) else next(r["loss"] for r in sel if r["keep"] == 1.0)
            row = {"task": task_name, "trained": trained, "full_loss": full}
            for method in cfg.methods:
                msel = [r for r in sel if r["method"] == method]
                row[f"min_keep_{method}"] = smallest_within(msel, full, cfg.tolerance)
                if task_name == "induction":
                    row[f"acc_{method}@{min(fractions):g}"] = next(r["accuracy"] for r in msel
                                                                 if r["keep"] == min(fractions))
            summary_rows.append(row)

    plots = []
    for task_name, metric, label in (("text", "loss", "validation loss (nats/byte)"),
                                     ("induction", "accuracy", "induction accuracy")):
        series = {}
        for t in ("dense", "ssa"):
            for m in cfg.methods:
                sel = [r for r in rows if (r["task"], r["trained"], r["method"]) == (task_name, t, m)]
                if sel:
                    series[f"{t}-trained, {m}"] = ([r["keep"] for r in sel], [r[metric] for r in sel])
        if series:
            plots.append(line_plot(ctx.out / f"{task_name}_{metric}.png", series, xlabel="kept fraction of connections",
                                   ylabel=label, title=f"Pathway pruning: {task_name}", logx=True))

    robust = {}
    # A model that never left the uniform guess (loss near ln vocab) has no pathways to prune: no comparison.
    chance = {"text": math.log(256), "induction": math.log(cfg.induction_vocab)}
    for task_name in ("text", "induction"):
        d = next((r for r in summary_rows if r["task"] == task_name and r["trained"] == "dense"), None)
        s = next((r for r in summary_rows if r["task"] == task_name and r["trained"] == "ssa"), None)
        learned = d and s and max(d["full_loss"], s["full_loss"]) < 0.9 * chance[task_name]
        if learned and "topk" in cfg.methods and d["min_keep_topk"] and s["min_keep_topk"]:
            robust[f"{task_name}_ssa_needs_fewer_connections"] = s["min_keep_topk"] < d["min_keep_topk"]

    r = ctx.report
    r.h("Pathway pruning", 1)
    r.p(f"Text models: {cfg.n_layer} layers, d={cfg.d_model}, {cfg.n_head} heads, context {cfg.seq_len}, "
        f"{cfg.steps} steps on {cfg.data} (bytes); SSA-trained: S={cfg.factor}, {cfg.sampling} sampling. "
        + (f"Induction models: {cfg.induction_layers} layer(s), k/v transform {cfg.induction_transform}, vocab "
           f"{cfg.induction_vocab}, length {cfg.induction_seq_len}, {cfg.induction_steps} steps. "
           if cfg.induction else "")
        + f"Device {ctx.device}{', quick run' if cfg.quick else ''}. The `prune` kernel computes every score "
        "(dense cost) and keeps, per query, the ceil(keep · visible) highest-scoring keys (topk), that many random "
        "keys (random, the control) or the nucleus of mass keep (topp), then renormalises. Every model, the "
        "SSA-trained ones included, is evaluated with exact scores; keep = 1 is exact attention.")
    r.h("Smallest kept fraction within tolerance", 2)
    r.p(f"min_keep_<method>: the smallest fraction from which on every larger fraction keeps the loss within "
        f"{cfg.tolerance:.0%} of full attention (blank: not even the largest pruned fraction).")
    r.table(summary_rows)
    if robust:
        r.p("SSA-trained needs fewer top-k connections than dense-trained: " +
            ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in robust.items()))
    r.h("Curves", 2)
    for p in plots:
        r.image(p)
    r.table(rows)
    r.h("Training", 2)
    r.table(train_rows)
    r.save()
    return {"summary": summary_rows, "robust": robust, "train": train_rows}
