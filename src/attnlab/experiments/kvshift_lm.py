"""KV shifting on a character- or byte-level language model: vanilla against KV-shift at equal parameters and
steps over several seeds, plus the paper's ablations (shift K only, V only, window 2) and a count of the
learned α/β like the paper's Table 4.

Within a seed every variant starts from the same weights (the transform's scalars aside) and sees the same
batches, so the per-seed difference to vanilla measures the mechanism, not the draw.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from typing import Literal

from ..bench.measure import mean_std
from ..errors import UserError
from ..report import line_plot
from ..run.config import DataConfig, RunConfig, lm_run, with_attention
from ..run.experiment import ExperimentConfig, experiment
from ..run.inspect import shift_coefficients

# Variant name -> transform options ("vanilla" has no transform).
VARIANTS: dict[str, dict | None] = {
    "vanilla": None,
    "kv_shift": {},
    "k_only": {"shift": "k"},
    "v_only": {"shift": "v"},
    "window2": {"window": 2},
}


def table4_counts(rows: list[dict]) -> dict[str, int]:
    """How many heads fall in each quadrant of (α1 > α2, β1 > β2), as in the paper's Table 4."""
    counts = {"a1>a2,b1>b2": 0, "a1>a2,b1<=b2": 0, "a1<=a2,b1>b2": 0, "a1<=a2,b1<=b2": 0}
    for r in rows:
        a = ">" if r["alpha_0"] > r["alpha_1"] else "<="
        b = ">" if r["beta_0"] > r["beta_1"] else "<="
        counts[f"a1{a}a2,b1{b}b2"] += 1
    return counts


@dataclass
class KVShiftLMConfig(ExperimentConfig):
    data: str = ""
    """a text file or folder (required)"""
    tokenizer: Literal["char", "byte"] = "char"
    """char: the corpus's characters; byte: the 256 byte values"""
    n_layer: int = 4
    """number of Transformer layers"""
    n_head: int = 4
    """attention heads per layer"""
    d_model: int = 128
    """model width"""
    seq_len: int = 128
    """tokens per training sequence (the model's context)"""
    batch_size: int = 16
    """sequences per training step"""
    steps: int = 600
    """training steps per run"""
    lr: float = 2e-3
    """peak learning rate (AdamW, cosine decay to lr/10)"""
    warmup_steps: int = 50
    """linear learning-rate warm-up steps"""
    eval_every: int = 100
    """steps between evaluations"""
    eval_batches: int = 10
    """validation batches per evaluation"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """seeds to run every variant with"""
    ablations: list[str] = field(default_factory=lambda: ["k_only", "v_only", "window2"])
    """ablations to run besides vanilla and KV-shift: k_only, v_only, window2"""
    ablation_seeds: int = 3
    """how many of `seeds` the ablations run on"""


def base(cfg: KVShiftLMConfig, seed: int, data: DataConfig, vocab_size: int) -> RunConfig:
    return lm_run(vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model, seq_len=cfg.seq_len,
                  batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                  eval_every=cfg.eval_every, seed=seed, data=data)


def variant_run(base_cfg: RunConfig, variant: str) -> RunConfig:
    """vanilla: no transform; every other variant: KV shifting with that variant's options."""
    opts = VARIANTS[variant]
    return with_attention(base_cfg, transform="none" if opts is None else "kv_shift",
                          transform_options=dict(opts or {}))


@experiment("kvshift-lm", KVShiftLMConfig, "KV shifting vs vanilla on a char/byte LM over seeds, with ablations")
def run(cfg: KVShiftLMConfig, ctx) -> dict:
    if cfg.quick:
        cfg = replace(cfg, n_layer=2, d_model=64, seq_len=64, batch_size=8, steps=min(cfg.steps, 60),
                      eval_every=20, eval_batches=2, seeds=cfg.seeds[:2], ablation_seeds=1)
    unknown = [a for a in cfg.ablations if a not in VARIANTS or a in ("vanilla", "kv_shift")]
    if unknown:
        raise UserError(f"unknown ablation(s) {unknown}; choose from k_only, v_only, window2")
    if not cfg.seeds:
        raise UserError("kvshift-lm needs at least one seed")
    data, tok, corpus = ctx.text(cfg.data, tokenizer=cfg.tokenizer, eval_batches=cfg.eval_batches)
    plan = [(v, s) for s in cfg.seeds for v in ("vanilla", "kv_shift")]
    plan += [(v, s) for s in cfg.seeds[: cfg.ablation_seeds] for v in cfg.ablations]

    runs, coef_rows = [], []
    for variant, seed in plan:
        print(f"== {variant} seed {seed}", flush=True)
        model, _, res = ctx.train(variant_run(base(cfg, seed, data, tok.vocab_size), variant), f"{variant}-seed{seed}",
                                  paired=True, corpus=corpus, tokenizer=tok)
        runs.append({"variant": variant, "seed": seed, "val_loss": res.final["val_loss"],
                     "params": model.num_params(non_embedding=False), "step_s": res.step_s,
                     "curve": [(e["step"], e["val_loss"]) for e in res.evals]})
        if variant != "vanilla":
            coef_rows += [{"variant": variant, "seed": seed, **r} for r in shift_coefficients(model)]
        print(f"   val_loss {res.final['val_loss']:.4f}", flush=True)

    vanilla = {r["seed"]: r["val_loss"] for r in runs if r["variant"] == "vanilla"}
    table = []
    for variant in ["vanilla", "kv_shift", *cfg.ablations]:
        mine = [r for r in runs if r["variant"] == variant]
        mean, std = mean_std([r["val_loss"] for r in mine])
        dmean, dstd = mean_std([r["val_loss"] - vanilla[r["seed"]] for r in mine])
        spread = len(mine) > 1  # one seed has no spread to show
        table.append({"variant": variant, "seeds": len(mine),
                      "val_loss": f"{mean:.4f} ± {std:.4f}" if spread else f"{mean:.4f}",
                      "vs_vanilla": f"{dmean:+.4f} ± {dstd:.4f}" if spread else f"{dmean:+.4f}",
                      "params": mine[0]["params"],
                      "wins": sum(r["val_loss"] < vanilla[r["seed"]] for r in mine) if variant != "vanilla" else "",
                      "mean": mean, "std": std, "delta_mean": dmean, "delta_std": dstd})

    ctx.report.csv("runs.csv", [{k: v for k, v in r.items() if k != "curve"} for r in runs])
    ctx.report.csv("coefficients.csv", coef_rows)
    curves = {}
    for variant in ["vanilla", "kv_shift", *cfg.ablations]:
        mine = [r["curve"] for r in runs if r["variant"] == variant]
        steps = [s for s, _ in mine[0]]
        curves[f"{variant} (mean of {len(mine)})"] = (steps, [statistics.fmean(c[i][1] for c in mine)
                                                               for i in range(len(steps))])
    plot = line_plot(ctx.out / "val_loss.png", curves, xlabel="step", ylabel="validation loss (nats/token)",
                     title="KV shifting vs vanilla")
    main_coefs = [r for r in coef_rows if r["variant"] == "kv_shift"]
    counts = table4_counts(main_coefs)
    per_layer = [{"layer": layer, **table4_counts([r for r in main_coefs if r["layer"] == layer])}
                 for layer in range(cfg.n_layer)]

    r = ctx.report
    r.h("KV shifting on a language model", 1)
    r.p(f"Corpus {cfg.data} ({cfg.tokenizer} tokenizer, vocabulary {tok.vocab_size}); {cfg.n_layer} layers, "
        f"d={cfg.d_model}, {cfg.n_head} heads, rotary, context {cfg.seq_len}, batch {cfg.batch_size}, "
        f"{cfg.steps} steps of AdamW (lr {cfg.lr}, cosine); seeds {cfg.seeds}; ablations on the first "
        f"{min(cfg.ablation_seeds, len(cfg.seeds))}. Device {ctx.device}. Validation loss is the final "
        f"evaluation on {cfg.eval_batches} batches of contiguous validation windows; `vs_vanilla` is the mean ± std "
        "over seeds of the paired difference (same seed: same initial weights and batches); `wins` counts seeds "
        "where the variant beat vanilla.")
    r.table(table, ["variant", "seeds", "val_loss", "vs_vanilla", "wins", "params"])
    r.image(plot, "validation loss")
    r.h("Learned shift weights (KV-shift, all seeds)", 2)
    r.p("Heads counted as the paper's Table 4 does (α1/β1 weigh the token's own key/value, α2/β2 the previous "
        "token's); every KV head of every layer and seed counts once. Raw values: coefficients.csv.")
    r.table([{"": "all layers", **counts}] + [{"": f"layer {p['layer']}", **p} for p in per_layer],
            ["", *counts])
    r.save()
    return {"results": {t["variant"]: {k: t[k] for k in ("seeds", "mean", "std", "delta_mean", "delta_std", "wins",
                                                           "params")} for t in table},
            "runs": [{k: v for k, v in x.items() if k != "curve"} for x in runs],
            "table4": counts, "table4_per_layer": per_layer}
