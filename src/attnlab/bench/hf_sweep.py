"""`attnlab bench hf-sweep`: HyperAttention with and without each key pre-scoring method, patched into the last
n layers of a local transformers checkpoint for several n: perplexity and forward time against the unpatched
model.

Every row is one `attnlab hf-eval` run (`attnlab.integrations.hf_eval.hf_eval`), which times the patched
and the unpatched model side by side, window by window, in the same process; each run's own JSON lands in
OUT/runs/. A checkpoint to try it on: `python -m attnlab.integrations.tiny_llama`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from ..run.experiment import ExperimentConfig, experiment

PRESCORES = ["none", "kmeans", "kmedian", "leverage", "norm"]


@dataclass
class HFSweepConfig(ExperimentConfig):
    out: str = "runs/hf-sweep"
    """output folder (must not hold an earlier run)"""
    model: str = ""
    """a local transformers checkpoint folder (required)"""
    data: str = ""
    """text file to evaluate on (required)"""
    context: int = 1024
    """tokens per window"""
    windows: int = 32
    """windows evaluated"""
    last: list[int] = field(default_factory=lambda: [1, 2, 4])
    """patch the last n layers, for each n"""
    hyper: dict = field(default_factory=dict)
    """options for hyper shared by every variant"""
    prescores: list[str] = field(default_factory=lambda: list(PRESCORES))
    """pre-scoring methods (none: plain hyper)"""
    equal_budget: bool = False
    """add plain hyper with sample_size + top_k sampled keys: the key budget of a query with pre-scoring (block +
    top_k + sample), spent on uniform samples instead"""
    repeats: int = 1
    """timed passes per window"""


def sweep_variants(cfg: HFSweepConfig) -> list[tuple[str, dict, str]]:
    """(mechanism, options, label) of every patched variant after the exact one."""
    from ..attention.hyper import HyperConfig

    bad = sorted(set(cfg.prescores) - set(PRESCORES))
    if bad:
        raise UserError(f"unknown pre-scoring method(s) {', '.join(bad)}; choose from {', '.join(PRESCORES)}")
    out = [("exact", {}, "exact")]
    for p in cfg.prescores:
        out.append(("hyper", {**cfg.hyper, "prescore": p}, "hyper" if p == "none" else f"hyper+{p}"))
        if p == "none" and cfg.equal_budget:
            base = HyperConfig(**{k: v for k, v in cfg.hyper.items() if k != "prescore"})
            out.append(("hyper", {**cfg.hyper, "prescore": "none", "sample_size": base.sample_size + base.top_k},
                        f"hyper, sample {base.sample_size + base.top_k} (equal budget)"))
    return out


@experiment("hf-sweep", HFSweepConfig, kind="benchmark")
def hf_sweep(cfg: HFSweepConfig, ctx) -> dict:
    """perplexity and time of a transformers checkpoint with hyper (each pre-scoring) in its last n layers"""
    from ..integrations.hf_eval import HFEvalConfig, hf_eval

    if not cfg.model or not cfg.data:
        raise UserError("hf-sweep needs --model (a local transformers checkpoint) and --data (a text file)")
    variants = sweep_variants(cfg)
    (ctx.out / "runs").mkdir()
    rows = []
    for n in cfg.last:
        for i, (name, opts, tag) in enumerate(variants):
            ecfg = HFEvalConfig(model=cfg.model, data=cfg.data, attention=name, options=opts, layers=f"last:{n}",
                                context=cfg.context, windows=cfg.windows, repeats=cfg.repeats, device=str(ctx.device),
                                seed=cfg.seed, out=str(ctx.out / "runs" / f"last{n}_{i}_{tag.split()[0].rstrip(',')}.json"))
            r = hf_eval(ecfg)
            rows.append({"last": n, "variant": tag, "ppl_unpatched": r["unpatched"]["perplexity"],
                         "ppl_patched": r["patched"]["perplexity"], "time_ratio": r["time_ratio"],
                         "s_per_window_unpatched": r["unpatched"]["seconds_per_window"],
                         "s_per_window_patched": r["patched"]["seconds_per_window"]})
    ctx.report.csv("sweep.csv", rows)
    rep = ctx.report
    rep.h("Pre-scoring in a transformers checkpoint", 1)
    rep.p(f"{cfg.model} on {cfg.data}: {cfg.windows} windows of {cfg.context} tokens on {ctx.device}; hyper options "
          f"{cfg.hyper}. Perplexities are e-based; time_ratio is patched over unpatched forward time.")
    rep.table(rows, ["last", "variant", "ppl_unpatched", "ppl_patched", "time_ratio"], fmt="{:.3f}")
    rep.save()
    return {"rows": rows}
