"""HyperAttention with and without each key pre-scoring method, patched into the last n layers of a local
transformers checkpoint for several n: perplexity and forward time against the unpatched model.

Every row is one `attnlab hf-eval` run (`attnlab.integrations.hf_eval.hf_eval`), which times the patched
and the unpatched model side by side, window by window, in the same process.

    python benchmarks/make_tiny_llama.py --data tinyshakespeare.txt --out runs/tiny-llama
    python benchmarks/hf_eval_sweep.py --model runs/tiny-llama --data runs/tiny-llama/heldout.txt \\
        --context 1024 --windows 32 --last 1 2 4 \\
        --hyper '{"min_seq_len": 256, "block_size": 64, "sample_size": 64, "top_k": 64}' --out runs/hf-sweep
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attnlab.integrations.hf_eval import HFEvalConfig, hf_eval

PRESCORES = ["none", "kmeans", "kmedian", "leverage", "norm"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--last", type=int, nargs="+", default=[1, 2, 4], help="patch the last n layers, for each n")
    ap.add_argument("--hyper", default="{}", help="JSON options for hyper shared by every variant")
    ap.add_argument("--prescores", nargs="+", default=PRESCORES)
    ap.add_argument("--equal-budget", action="store_true",
                    help="add plain hyper with sample_size + top_k sampled keys: the key budget of a query "
                         "with pre-scoring (block + top_k + sample), spent on uniform samples instead")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="runs/hf-sweep")
    args = ap.parse_args(argv)

    hyper = json.loads(args.hyper)
    variants = [("exact", {}, "exact")]
    for p in args.prescores:
        variants.append(("hyper", {**hyper, "prescore": p}, "hyper" if p == "none" else f"hyper+{p}"))
        if p == "none" and args.equal_budget:
            from attnlab.attention.hyper import HyperConfig

            base = HyperConfig(**{k: v for k, v in hyper.items() if k != "prescore"})
            variants.append(("hyper", {**hyper, "prescore": "none", "sample_size": base.sample_size + base.top_k},
                             f"hyper, sample {base.sample_size + base.top_k} (equal budget)"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.last:
        for i, (name, opts, tag) in enumerate(variants):
            cfg = HFEvalConfig(model=args.model, data=args.data, attention=name, options=opts, layers=f"last:{n}",
                               context=args.context, windows=args.windows, repeats=args.repeats, device="cpu",
                               out=str(out / f"last{n}_{i}_{tag.split()[0].rstrip(',')}.json"))
            r = hf_eval(cfg)
            rows.append({"last": n, "variant": tag, "ppl_unpatched": r["unpatched"]["perplexity"],
                         "ppl_patched": r["patched"]["perplexity"], "time_ratio": r["time_ratio"],
                         "s_per_window_unpatched": r["unpatched"]["seconds_per_window"],
                         "s_per_window_patched": r["patched"]["seconds_per_window"]})
    lines = ["| last n layers | attention | perplexity (e), unpatched | perplexity (e), patched "
             "| time patched / unpatched |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['last']} | {r['variant']} | {r['ppl_unpatched']:.3f} | {r['ppl_patched']:.3f} | "
                     f"{r['time_ratio']:.2f} |")
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
