"""SSA speed and memory against exact attention, all ratios measured side by side in one run.

Part 1 (attention): forward + backward of one causal attention call, q/k/v [B, H, N, D] laid out as the
layer's projections are, for n in --ns, SSA with S in --factors (unbiased and local sampling) against
`exact` (torch SDPA: flash / memory-efficient kernels) and `naive` (scores materialised, softmax, matmul: the
vanilla attention of the paper's baselines). Time: median of --repeats after a warm-up, in process CPU time on
CPU (run it with one thread: OMP_NUM_THREADS=1) and wall time on CUDA. Memory: peak tensor
memory the call allocates beyond its inputs (`attnlab.bench.memory.peak_memory`: the CUDA allocator's peak,
or a dispatch-mode tally on CPU), gradients of q, k, v included.

Part 2 (training step): one full optimizer step (forward, backward, AdamW) of a byte-level LM at n in
--step-ns, dense against SSA S=4 (unbiased and local) and S=8 (unbiased); the configurations alternate
within each repeat. The model is the `attnlab run ssa` LM at its defaults (4 layers, d = 256 as 4 heads × 64,
rotary, GELU MLP of 4·d, tied embeddings) with its context set to n; batch --step-batch.

    python benchmarks/ssa_speed.py --out runs/ssa_speed            # defaults for the device found
    python benchmarks/ssa_speed.py --quick --out /tmp/ssa_speed     # a small smoke run

Writes attention.csv, train_step.csv, results.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from attnlab.attention import build_kernel
from attnlab.bench.measure import interleaved
from attnlab.bench.memory import peak_memory
from attnlab.run.experiment import markdown_table
from attnlab.models.lm import LM, LMConfig
from attnlab.training.device import resolve_device
from attnlab.training.trainer import OptimConfig, make_optimizer


def naive_attention(q, k, v, causal=True):
    s = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if causal:
        n = q.shape[2]
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.matmul(torch.softmax(s.float(), dim=-1).to(q.dtype), v)


def attention_case(kind, n, args, device, dtype):
    """A closure running forward + backward of one causal attention call."""
    b, h, d = args.batch, args.heads, args.head_dim
    g = torch.Generator(device=device).manual_seed(n)
    # Leaves [B, N, H, D] viewed as [B, H, N, D], the way MultiHeadAttention's projections lie in memory.
    leaves = [torch.randn(b, n, h, d, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in leaves)
    grad = torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g)
    if kind == "exact":
        fn = build_kernel("exact")
    elif kind == "naive":
        fn = naive_attention
    else:
        _, sampling, s = kind.split(":")
        fn = build_kernel("ssa", {"factor": int(s), "sampling": sampling})
        fn.set_mode("sample")

    def step():
        out = fn(q, k, v, causal=True)
        out.backward(grad)
        for t in leaves:
            t.grad = None

    return step


def median_seconds(steps: dict, device, repeats) -> dict:
    """Median seconds of each closure, the closures taking turns within every repeat (process CPU time on
    CPU, where the runs are single-threaded; wall time on CUDA)."""
    return {label: statistics.median(ts) for label, ts in interleaved(steps, repeats, device).items()}


def train_step_case(spec, n, args, device, amp):
    """(seconds per optimizer step, peak bytes) of a byte-level LM at context n."""
    name, opts = spec
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=256, n_layer=args.layers, n_head=args.heads, d_model=args.heads * args.head_dim,
                   max_seq_len=n)
    cfg.attention.name, cfg.attention.options = name, dict(opts)
    model = LM(cfg).to(device)
    model.train()
    opt = make_optimizer(model, OptimConfig())
    x = torch.randint(0, 256, (args.step_batch, n + 1), device=device)

    def step():
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else torch.autocast(device.type, enabled=False)
        with ctx:
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ssa_speed")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ns", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--factors", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--samplings", nargs="+", default=["unbiased", "local"])
    p.add_argument("--naive-max-n", type=int, default=None, help="skip the materialised baseline above this n")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--step-ns", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--step-batch", type=int, default=None)
    p.add_argument("--skip-steps", action="store_true")
    args = p.parse_args(argv)
    device, amp = resolve_device(args.device, args.dtype)
    cuda = device.type == "cuda"
    dtype = amp or torch.float32
    args.batch = args.batch or (4 if cuda else 1)
    args.heads = args.heads or (8 if cuda else 4)
    args.repeats = args.repeats or (10 if cuda else 3)
    args.step_batch = args.step_batch or (8 if cuda else 1)
    args.naive_max_n = args.naive_max_n or (8192 if cuda else 4096)
    if args.quick:
        args.ns, args.factors, args.step_ns, args.repeats, args.layers = [256, 512], [2, 4], [256, 512], 1, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": str(dtype),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "argv": sys.argv[1:],
           "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "repeats": args.repeats,
           "clock": "wall" if cuda else "process cpu time"}
    print(json.dumps(env), flush=True)

    kinds = ["exact", "naive"] + [f"ssa:{s}:{f}" for s in args.samplings for f in args.factors]
    attn_rows = []
    for n in args.ns:
        steps = {kind: attention_case(kind, n, args, device, dtype) for kind in kinds
                 if kind != "naive" or n <= args.naive_max_n}
        try:
            secs = median_seconds(steps, device, args.repeats)
            peaks = {kind: peak_memory(step, device)[1] for kind, step in steps.items()}
        except torch.OutOfMemoryError:
            print(f"n={n}: out of memory", flush=True)
            continue
        finally:
            del steps
            if cuda:
                torch.cuda.empty_cache()
        for kind, sec in secs.items():
            peak = peaks[kind]
            row = {"n": n, "kind": kind, "ms": sec * 1e3, "peak_MB": peak / 2**20,
                   "speedup_vs_exact": secs["exact"] / sec, "mem_vs_exact": peak / peaks["exact"]}
            if "naive" in secs:
                row["speedup_vs_naive"] = secs["naive"] / sec
                row["mem_vs_naive"] = peak / peaks["naive"]
            attn_rows.append(row)
            print(f"n={n:5d} {kind:16s} {sec * 1e3:9.2f} ms {peak / 2**20:9.1f} MB", flush=True)

    step_rows = []
    if not args.skip_steps:
        specs = {"dense": ("exact", {}), "ssa-unbiased-S4": ("ssa", {"factor": 4}),
                 "ssa-unbiased-S8": ("ssa", {"factor": 8}),
                 "ssa-local-S4": ("ssa", {"factor": 4, "sampling": "local"})}
        for n in args.step_ns:
            steps = {label: train_step_case(spec, n, args, device, amp) for label, spec in specs.items()}
            secs = median_seconds({label: step for label, (_, step) in steps.items()}, device, max(args.repeats, 2))
            for label, (model, step) in steps.items():
                _, peak = peak_memory(step, device)
                sec, dense = secs[label], secs["dense"]
                step_rows.append({"n": n, "model": label, "step_ms": sec * 1e3, "speedup_vs_dense": dense / sec,
                                  "peak_MB": peak / 2**20})
                print(f"step n={n:5d} {label:16s} {sec * 1e3:9.1f} ms  x{dense / sec:.2f}  {peak / 2**20:.0f} MB",
                      flush=True)
            for label in list(steps):
                steps[label] = None
            del steps
            if cuda:
                torch.cuda.empty_cache()
        for r in step_rows:
            d = next(x for x in step_rows if x["n"] == r["n"] and x["model"] == "dense")
            r["mem_vs_dense"] = r["peak_MB"] / d["peak_MB"]

    def write_csv(name, rows):
        import csv

        cols = list(dict.fromkeys(k for r in rows for k in r))
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)

    write_csv("attention.csv", attn_rows)
    if step_rows:
        write_csv("train_step.csv", step_rows)
    (out / "results.json").write_text(json.dumps({"env": env, "attention": attn_rows, "train_step": step_rows},
                                                 indent=2))
    print()
    print(markdown_table(attn_rows, fmt="{:.3g}"))
    if step_rows:
        print()
        print(markdown_table(step_rows, fmt="{:.3g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
