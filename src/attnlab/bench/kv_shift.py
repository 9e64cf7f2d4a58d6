"""`attnlab bench kv-shift-overhead`: training-step overhead of KV shifting against vanilla attention, side by side.

Both models have the same weights (KV-shift adds 4 scalars per KV head and layer) and train on the same
batch. Steps alternate A B B A … so that drifts of the machine's speed (other processes, clocks) hit both
alike; the ratio is taken of the medians. On CPU the clock is the process's CPU time (`attnlab.bench.measure`),
which includes the kernel's time spent mapping fresh pages: the table reports those page faults per step, and
`--keep_freed_memory` stops glibc from handing freed memory back, so that both models reuse their pages.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from ..attention import AttentionSpec
from ..models.lm import LMConfig
from ..run.build import build_model
from ..run.experiment import ExperimentConfig, experiment
from .measure import clock, interleaved, keep_freed_memory, optimizer_step, page_faults


@dataclass
class KVShiftOverheadConfig(ExperimentConfig):
    out: str = "runs/kv_shift_overhead"
    """output folder (must not hold an earlier run)"""
    contexts: list[int] = field(default_factory=lambda: [256, 1024])
    """context lengths, one row each"""
    layers: int = 4
    """transformer layers"""
    d_model: int = 256
    """model width"""
    heads: int = 4
    """attention heads"""
    vocab: int = 256
    """vocabulary size"""
    window: int = 1
    """KV-shift window"""
    tokens: int = 4096
    """tokens per step (batch = tokens // context)"""
    rounds: int = 20
    """timed rounds (each steps both models)"""
    warmup: int = 3
    """untimed rounds first"""
    clock: str = "auto"
    """auto (wall clock on CUDA, process CPU time on CPU), wall or cpu"""
    keep_freed_memory: bool = False
    """glibc keeps freed memory (no heap trimming, large blocks from the heap): see the module docstring"""


def measure(context: int, cfg: KVShiftOverheadConfig, device, amp) -> dict:
    batch = max(1, cfg.tokens // context)
    models = {}
    for name, tf in (("vanilla", "none"), ("kv_shift", "kv_shift")):
        spec = AttentionSpec(transform=tf, transform_options={"window": cfg.window} if tf != "none" else {})
        mcfg = LMConfig(vocab_size=cfg.vocab, n_layer=cfg.layers, n_head=cfg.heads, d_model=cfg.d_model,
                        max_seq_len=context, attention=spec)
        models[name] = build_model(mcfg, cfg.seed, paired=True).to(device).train()
    x = torch.randint(0, cfg.vocab, (batch, context), device=device)
    steps = {name: optimizer_step(m, x, x, device, amp) for name, m in models.items()}
    times = interleaved(steps, cfg.rounds, device, clock_kind=cfg.clock, warmup=cfg.warmup, alternate=True)
    faults = {name: page_faults(fn) for name, fn in steps.items()} if device.type == "cpu" else {}
    wall = clock(cfg.clock, device) is time.perf_counter
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


@experiment("kv-shift-overhead", KVShiftOverheadConfig, kind="benchmark")
def kv_shift_overhead(cfg: KVShiftOverheadConfig, ctx) -> dict:
    """training-step time of KV shifting over vanilla attention, the two models taking turns"""
    clock(cfg.clock, ctx.device)  # refuses a clock the device cannot have before anything is built
    if cfg.keep_freed_memory:
        keep_freed_memory()
    setup = (f"{cfg.layers} layers, d {cfg.d_model}, {cfg.heads} heads, window {cfg.window}, {cfg.tokens} tokens per "
             f"step, on {ctx.device} ({torch.get_num_threads()} threads), {cfg.rounds} alternating rounds after "
             f"{cfg.warmup} warm-up; {'freed memory kept' if cfg.keep_freed_memory else 'default allocator'}")
    print(f"{setup}; autocast {ctx.amp}, clock {cfg.clock}")
    rows = []
    for c in cfg.contexts:
        rows.append(measure(c, cfg, ctx.device, ctx.amp))
        print(f"  context {c}: ratio of medians {rows[-1]['ratio']:.3f}, median paired {rows[-1]['paired_ratio']:.3f}")
    ctx.report.csv("overhead.csv", rows)
    r = ctx.report
    r.h("KV-shift training-step overhead", 1)
    r.p(f"{setup}. Ratios are KV-shift over vanilla; paired_ratio is the median of per-round ratios; page faults per "
        "step are counted on CPU only.")
    r.table(rows, fmt="{:.3f}")
    r.save()
    return {"rows": rows}
