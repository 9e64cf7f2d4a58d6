"""`attnlab bench prescore-overhead`: forward-time overhead of each key pre-scoring method over plain
HyperAttention, measured side by side.

`attnlab bench attention` times each variant's repeats one after the other; on a machine shared with other
jobs the load then differs between variants and the overhead ratios swing by tens of percent from run to
run. Here every round runs plain hyper and every pre-scored variant once, in turn, on the same q/k/v, and
the overhead is the median over rounds of (time of the variant / time of plain hyper in that round) − 1; the
ratio of the per-variant minima is reported too. On CPU times are the CPU time of this process (one thread
by default: what an idle machine's wall clock would show); on CUDA the wall clock.

Plain hyper uses the official defaults (7 LSH bits, block 256, 256 samples, exact up to 4096); pre-scored
variants keep the key budget: `top_k` pre-scored keys + (256 - top_k) sampled ones.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from ..attention.hyper import HyperConfig, hyper_attention
from ..attention.hyper.prescore import METHODS
from ..errors import UserError
from ..run.experiment import ExperimentConfig, experiment
from .measure import interleaved


@dataclass
class PrescoreOverheadConfig(ExperimentConfig):
    out: str = "runs/prescore_overhead"
    """output folder (must not hold an earlier run)"""
    n: list[int] = field(default_factory=lambda: [32768])
    """sequence lengths"""
    modes: list[str] = field(default_factory=lambda: ["causal", "noncausal"])
    """causal and/or noncausal"""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """pre-scoring methods (kmedian adds the textbook L1 k-medians beside it)"""
    top_k: int = 128
    """pre-scored keys, out of plain hyper's 256 sampled ones"""
    heads: int = 8
    """attention heads"""
    head_dim: int = 64
    """dimension per head"""
    rounds: int = 7
    """rounds; each runs every variant once"""
    threads: int = 1
    """torch CPU threads (0: torch's default)"""


def measure(n: int, causal: bool, cfg: PrescoreOverheadConfig, device, dtype) -> dict:
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, cfg.heads, n, cfg.head_dim, generator=g).to(device, dtype) for _ in range(3))
    plain = HyperConfig()
    budget = dict(top_k=cfg.top_k, sample_size=plain.sample_size - cfg.top_k)
    configs = {"hyper": plain, **{f"hyper+{m}": HyperConfig(prescore=m, **budget) for m in cfg.methods}}
    if "kmedian" in cfg.methods:  # textbook k-medians too, beside the papers' Euclidean k-median
        configs["hyper+kmedian(l1)"] = HyperConfig(prescore="kmedian", kmedian_distance="l1", **budget)

    def run(hcfg):
        with torch.no_grad():
            hyper_attention(q, k, v, hcfg, causal=causal)

    times = interleaved({name: (lambda c=c: run(c)) for name, c in configs.items()}, cfg.rounds, device)
    base = times["hyper"]
    rows = {}
    for name, ts in times.items():
        rows[name] = {"min_s": min(ts), "times_s": ts}
        if name != "hyper":
            rows[name]["overhead_median_of_ratios"] = statistics.median(t / b for t, b in zip(ts, base)) - 1
            rows[name]["overhead_of_minima"] = min(ts) / min(base) - 1
    return rows


@experiment("prescore-overhead", PrescoreOverheadConfig, kind="benchmark")
def prescore_overhead(cfg: PrescoreOverheadConfig, ctx) -> dict:
    """forward-time overhead of each key pre-scoring method over plain HyperAttention, variants taking turns"""
    bad = sorted(set(cfg.methods) - set(METHODS)) + sorted(set(cfg.modes) - {"causal", "noncausal"})
    if bad:
        raise UserError(f"unknown method(s) or mode(s) {', '.join(bad)}; methods: {', '.join(METHODS)}; "
                        "modes: causal, noncausal")
    if not 1 <= cfg.top_k <= HyperConfig().sample_size:
        raise UserError(f"top_k must be between 1 and {HyperConfig().sample_size} (plain hyper's sample budget)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    results, table = [], []
    for n in cfg.n:
        for mode in cfg.modes:
            rows = measure(n, mode == "causal", cfg, ctx.device, ctx.amp or torch.float32)
            results.append({"n": n, "mode": mode, "rows": rows})
            print(f"{mode} n={n}: plain hyper {rows['hyper']['min_s']:.3f} s (min of {cfg.rounds})")
            for name, r in rows.items():
                table.append({"n": n, "mode": mode, "variant": name, **{k: v for k, v in r.items() if k != "times_s"}})
                if name != "hyper":
                    print(f"  {name:15s} {r['min_s']:.3f} s  overhead {r['overhead_median_of_ratios']:+.1%} "
                          f"(median of per-round ratios), {r['overhead_of_minima']:+.1%} (ratio of minima)")
    ctx.report.csv("overhead.csv", table)
    ctx.report.jsonl("times.jsonl", [{"n": x["n"], "mode": x["mode"], "variant": name, "times_s": r["times_s"]}
                                     for x in results for name, r in x["rows"].items()])
    r = ctx.report
    r.h("Pre-scoring overhead over plain HyperAttention", 1)
    r.p(f"{cfg.heads} heads, head dim {cfg.head_dim}, on {ctx.device} ({torch.get_num_threads()} threads); "
        f"{cfg.rounds} rounds, every variant once per round on the same q/k/v; pre-scored variants: top_k "
        f"{cfg.top_k} + {HyperConfig().sample_size - cfg.top_k} sampled keys. Overheads: median over rounds of "
        "(variant / plain hyper) − 1, and the ratio of minima − 1. Per-round times: times.jsonl.")
    r.table(table)
    r.save()
    return {"results": results}
