"""Forward-time overhead of each key pre-scoring method over plain HyperAttention, measured side by side.

`attnlab bench attention` times each variant's repeats one after the other; on a machine shared with other
jobs the load then differs between variants and the overhead ratios swing by tens of percent from run to
run. Here every round runs plain hyper and every pre-scored variant once, in turn, on the same q/k/v, and
the overhead is the median over rounds of (time of the variant / time of plain hyper in that round) − 1; the
ratio of the per-variant minima is reported too. Times are the CPU time of this process (one thread: what
an idle machine's wall clock would show).

Plain hyper uses the official defaults (7 LSH bits, block 256, 256 samples, exact up to 4096); pre-scored
variants keep the key budget: `top_k` pre-scored keys + (256 - top_k) sampled ones.

    OMP_NUM_THREADS=1 python benchmarks/prescore_overhead.py --n 32768 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from attnlab.attention.hyper import HyperConfig, hyper_attention
from attnlab.attention.hyper.prescore import METHODS
from attnlab.bench.measure import interleaved


def measure(n: int, causal: bool, args) -> dict:
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, args.heads, n, args.head_dim, generator=g) for _ in range(3))
    plain = HyperConfig()
    budget = dict(top_k=args.top_k, sample_size=plain.sample_size - args.top_k)
    configs = {"hyper": plain, **{f"hyper+{m}": HyperConfig(prescore=m, **budget) for m in args.methods}}
    if "kmedian" in args.methods:  # textbook k-medians too, beside the papers' Euclidean k-median
        configs["hyper+kmedian(l1)"] = HyperConfig(prescore="kmedian", kmedian_distance="l1", **budget)

    def run(cfg):
        with torch.no_grad():
            hyper_attention(q, k, v, cfg, causal=causal)

    times = interleaved({name: (lambda cfg=cfg: run(cfg)) for name, cfg in configs.items()}, args.rounds,
                        torch.device("cpu"), clock_kind="cpu")
    base = times["hyper"]
    rows = {}
    for name, ts in times.items():
        rows[name] = {"min_s": min(ts), "times_s": ts}
        if name != "hyper":
            rows[name]["overhead_median_of_ratios"] = statistics.median(t / b for t, b in zip(ts, base)) - 1
            rows[name]["overhead_of_minima"] = min(ts) / min(base) - 1
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[32768])
    ap.add_argument("--modes", nargs="+", default=["causal", "noncausal"], choices=["causal", "noncausal"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--top_k", type=int, default=128)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = []
    for n in args.n:
        for mode in args.modes:
            rows = measure(n, mode == "causal", args)
            results.append({"n": n, "mode": mode, "rows": rows})
            print(f"{mode} n={n}: plain hyper {rows['hyper']['min_s']:.3f} s (min of {args.rounds})")
            for name, r in rows.items():
                if name != "hyper":
                    print(f"  {name:15s} {r['min_s']:.3f} s  overhead {r['overhead_median_of_ratios']:+.1%} "
                          f"(median of per-round ratios), {r['overhead_of_minima']:+.1%} (ratio of minima)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
