"""Training-step overhead of KV shifting against vanilla attention, measured side by side in one process.

Both models have the same weights (KV-shift adds 4 scalars per KV head and layer) and train on the same
batch. Steps alternate A B B A … so that drifts of the machine's speed (other processes, clocks) hit both
alike; the ratio is taken of the medians. On CPU the clock is the process's CPU time (`attnlab.bench.measure`),
which includes the kernel's time spent mapping fresh pages: the table reports those page faults per step, and
`--keep-freed-memory` stops glibc from handing freed memory back, so that both models reuse their pages.

    python benchmarks/kv_shift_overhead.py                     # 4 layers, d 256, contexts 256 and 1024
    python benchmarks/kv_shift_overhead.py --keep-freed-memory
    python benchmarks/kv_shift_overhead.py --device cuda --contexts 256 1024 4096
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from attnlab.attention import AttentionSpec
from attnlab.bench.measure import CLOCKS, clock, interleaved, keep_freed_memory, page_faults
from attnlab.errors import UserError
from attnlab.run.build import build_model
from attnlab.models.lm import LMConfig
from attnlab.training.device import autocast, resolve_device
from attnlab.training.trainer import OptimConfig, make_optimizer


def make_step(model, x, device, amp):
    opt = make_optimizer(model, OptimConfig())

    def step():
        with autocast(device, amp):
            _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(context: int, args, device, amp) -> dict:
    batch = max(1, args.tokens // context)
    models = {}
    for name, tf in (("vanilla", "none"), ("kv_shift", "kv_shift")):
        cfg = LMConfig(vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, d_model=args.d_model,
                       max_seq_len=context, attention=AttentionSpec(transform=tf,
                                                                    transform_options={"window": args.window}
                                                                    if tf != "none" else {}))
        models[name] = build_model(cfg, 0, paired=True).to(device).train()
    x = torch.randint(0, args.vocab, (batch, context), device=device)
    steps = {name: make_step(m, x, device, amp) for name, m in models.items()}
    times = interleaved(steps, args.rounds, device, clock_kind=args.clock, warmup=args.warmup, alternate=True)
    faults = {name: page_faults(fn) for name, fn in steps.items()} if device.type == "cpu" else {}
    wall = clock(args.clock, device) is time.perf_counter
    med = {name: statistics.median(ts) for name, ts in times.items()}
    # Each round times the two back to back: the median of per-round ratios shrugs off bursts of load.
    paired = statistics.median(k / v for k, v in zip(times["kv_shift"], times["vanilla"]))
    return {"context": context, "batch": batch, "clock": "wall" if wall else "cpu",
            "vanilla_ms": med["vanilla"] * 1e3, "kv_shift_ms": med["kv_shift"] * 1e3,
            "ratio": med["kv_shift"] / med["vanilla"], "paired_ratio": paired,
            # Load from other processes only ever adds time: the fastest steps are the least disturbed.
            "ratio_of_minima": min(times["kv_shift"]) / min(times["vanilla"]),
            "ratio_of_means": statistics.fmean(times["kv_shift"]) / statistics.fmean(times["vanilla"]),
            "vanilla_faults": faults.get("vanilla"), "kv_shift_faults": faults.get("kv_shift")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--window", type=int, default=1)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch = tokens // context)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--clock", choices=CLOCKS, default="auto",
                   help="auto: wall clock on CUDA, process CPU time on CPU")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc keeps freed memory (no heap trimming, large blocks from the heap): see the docstring")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.keep_freed_memory:
        try:
            keep_freed_memory()
        except UserError as e:
            p.error(str(e))
    device, amp = resolve_device(args.device, args.dtype)
    print(f"device {device}, autocast {amp}, torch threads {torch.get_num_threads()}; {args.layers} layers, "
          f"d {args.d_model}, {args.heads} heads, {args.tokens} tokens/step, window {args.window}, "
          f"{args.rounds} alternating rounds, clock {args.clock}, "
          f"{'freed memory kept' if args.keep_freed_memory else 'default allocator'}")
    rows = [measure(c, args, device, amp) for c in args.contexts]
    print("| context | batch | clock | vanilla ms/step | KV-shift ms/step | ratio of medians | median paired ratio | "
          "ratio of means | ratio of minima | page faults/step, vanilla | page faults/step, KV-shift |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    faults = lambda n: "—" if n is None else f"{n:.0f}"  # noqa: E731  (not counted on CUDA)
    for r in rows:
        print(f"| {r['context']} | {r['batch']} | {r['clock']} | {r['vanilla_ms']:.1f} | {r['kv_shift_ms']:.1f} | {r['ratio']:.3f} | "
              f"{r['paired_ratio']:.3f} | {r['ratio_of_means']:.3f} | {r['ratio_of_minima']:.3f} | "
              f"{faults(r['vanilla_faults'])} | {faults(r['kv_shift_faults'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
