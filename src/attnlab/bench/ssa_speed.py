"""`attnlab bench ssa-speed`: SSA speed and memory against exact attention, all ratios measured side by side.

Part 1 (attention): forward + backward of one causal attention call, q/k/v [B, H, N, D] laid out as the
layer's projections are, for n in `ns`, SSA with S in `factors` (each of `samplings`) against `exact` (torch
SDPA: flash / memory-efficient kernels) and `naive` (scores materialised, softmax, matmul: the vanilla
attention of the paper's baselines). Time: median of `repeats` after a warm-up, the cases taking turns, in
process CPU time on CPU (run it with one thread: OMP_NUM_THREADS=1) and wall time on CUDA. Memory: peak tensor
memory the call allocates beyond its inputs (`attnlab.bench.memory.peak_memory`), gradients of q, k, v included.

Part 2 (training step): one full optimizer step (forward, backward, AdamW) of a byte-level LM at n in
`step_ns`, dense against SSA S=4 (unbiased and local) and S=8 (unbiased); the configurations alternate
within each repeat. The model is the `attnlab run ssa` LM at its defaults (4 layers, d = heads × head_dim,
rotary, GELU MLP of 4·d, tied embeddings) with its context set to n; batch `step_batch`.

Sizes left at 0 take a default for the device found (CUDA / CPU).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace

import torch

from ..attention import AttentionSpec, build_kernel
from ..models.lm import LMConfig
from ..run.build import build_model
from ..run.experiment import ExperimentConfig, experiment
from .measure import interleaved, optimizer_step
from .memory import peak_memory


@dataclass
class SSASpeedConfig(ExperimentConfig):
    out: str = "runs/ssa_speed"
    """output folder (must not hold an earlier run)"""
    ns: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192])
    """sequence lengths of the attention part"""
    factors: list[int] = field(default_factory=lambda: [2, 4, 8])
    """SSA sampling factors S"""
    samplings: list[str] = field(default_factory=lambda: ["unbiased", "local"])
    """SSA sampling schemes"""
    naive_max_n: int = 0
    """skip the materialised baseline above this n; 0: 8192 on CUDA, 4096 on CPU"""
    batch: int = 0
    """batch of the attention part; 0: 4 on CUDA, 1 on CPU"""
    heads: int = 0
    """heads; 0: 8 on CUDA, 4 on CPU"""
    head_dim: int = 64
    """dimension per head"""
    repeats: int = 0
    """timed repeats; 0: 10 on CUDA, 3 on CPU"""
    step_ns: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    """contexts of the training-step part"""
    layers: int = 4
    """layers of the training-step LM"""
    step_batch: int = 0
    """batch of the training-step part; 0: 8 on CUDA, 1 on CPU"""
    skip_steps: bool = False
    """skip the training-step part"""


def naive_attention(q, k, v, causal=True):
    s = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if causal:
        n = q.shape[2]
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.matmul(torch.softmax(s.float(), dim=-1).to(q.dtype), v)


def attention_case(kind, n, cfg: SSASpeedConfig, device, dtype):
    """A closure running forward + backward of one causal attention call."""
    b, h, d = cfg.batch, cfg.heads, cfg.head_dim
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


def train_step_case(spec: AttentionSpec, n, cfg: SSASpeedConfig, device, amp):
    """A closure running one optimizer step of a byte-level LM at context n."""
    mcfg = LMConfig(vocab_size=256, n_layer=cfg.layers, n_head=cfg.heads, d_model=cfg.heads * cfg.head_dim,
                    max_seq_len=n, attention=spec)
    model = build_model(mcfg, cfg.seed).to(device).train()
    x = torch.randint(0, 256, (cfg.step_batch, n + 1), device=device)
    return optimizer_step(model, x[:, :-1], x[:, 1:], device, amp)


def attention_rows(cfg: SSASpeedConfig, device, dtype) -> list[dict]:
    kinds = ["exact", "naive"] + [f"ssa:{s}:{f}" for s in cfg.samplings for f in cfg.factors]
    rows = []
    for n in cfg.ns:
        steps = {kind: attention_case(kind, n, cfg, device, dtype) for kind in kinds
                 if kind != "naive" or n <= cfg.naive_max_n}
        try:
            secs = {kind: statistics.median(ts) for kind, ts in interleaved(steps, cfg.repeats, device).items()}
            peaks = {kind: peak_memory(step, device)[1] for kind, step in steps.items()}
        except torch.OutOfMemoryError:
            print(f"n={n}: out of memory", flush=True)
            continue
        finally:
            del steps
            torch.cuda.empty_cache()  # a no-op unless CUDA is in use
        for kind, sec in secs.items():
            peak = peaks[kind]
            row = {"n": n, "kind": kind, "ms": sec * 1e3, "peak_MB": peak / 2**20,
                   "speedup_vs_exact": secs["exact"] / sec, "mem_vs_exact": peak / peaks["exact"]}
            if "naive" in secs:
                row["speedup_vs_naive"] = secs["naive"] / sec
                row["mem_vs_naive"] = peak / peaks["naive"]
            rows.append(row)
            print(f"n={n:5d} {kind:16s} {sec * 1e3:9.2f} ms {peak / 2**20:9.1f} MB", flush=True)
    return rows


def step_rows(cfg: SSASpeedConfig, device, amp) -> list[dict]:
    specs = {"dense": AttentionSpec(), "ssa-unbiased-S4": AttentionSpec("ssa", {"factor": 4}),
             "ssa-unbiased-S8": AttentionSpec("ssa", {"factor": 8}),
             "ssa-local-S4": AttentionSpec("ssa", {"factor": 4, "sampling": "local"})}
    rows = []
    for n in cfg.step_ns:
        steps = {label: train_step_case(spec, n, cfg, device, amp) for label, spec in specs.items()}
        secs = {label: statistics.median(ts) for label, ts in interleaved(steps, max(cfg.repeats, 2), device).items()}
        peaks = {label: peak_memory(step, device)[1] for label, step in steps.items()}
        for label, sec in secs.items():
            peak, dense = peaks[label], secs["dense"]
            rows.append({"n": n, "model": label, "step_ms": sec * 1e3, "speedup_vs_dense": dense / sec,
                         "peak_MB": peak / 2**20, "mem_vs_dense": peak / peaks["dense"]})
            print(f"step n={n:5d} {label:16s} {sec * 1e3:9.1f} ms  x{dense / sec:.2f}  {peak / 2**20:.0f} MB", flush=True)
        del steps
        torch.cuda.empty_cache()
    return rows


@experiment("ssa-speed", SSASpeedConfig, kind="benchmark")
def ssa_speed(cfg: SSASpeedConfig, ctx) -> dict:
    """SSA time and memory against exact and naive attention, and training steps against dense, side by side"""
    device, amp = ctx.device, ctx.amp
    cuda = device.type == "cuda"
    pick = {"batch": (4, 1), "heads": (8, 4), "repeats": (10, 3), "step_batch": (8, 1), "naive_max_n": (8192, 4096)}
    cfg = replace(cfg, **{k: getattr(cfg, k) or v[0 if cuda else 1] for k, v in pick.items()})
    if cfg.quick:
        cfg = replace(cfg, ns=[256, 512], factors=[2, 4], step_ns=[256, 512], repeats=1, layers=2)
    dtype = amp or torch.float32
    env = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": str(dtype),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": cfg.batch, "heads": cfg.heads,
           "head_dim": cfg.head_dim, "repeats": cfg.repeats, "clock": "wall" if cuda else "process cpu time"}
    print(env, flush=True)
    attn = attention_rows(cfg, device, dtype)
    steps = [] if cfg.skip_steps else step_rows(cfg, device, amp)
    r = ctx.report
    r.h("SSA speed and memory", 1)
    r.p(", ".join(f"{k} {v}" for k, v in env.items()) + ". Times are medians over repeats, the cases taking turns.")
    r.h("Attention call (forward + backward, causal)")
    r.csv("attention.csv", attn)
    r.table(attn, fmt="{:.3g}")
    if steps:
        r.h("Training step")
        r.csv("train_step.csv", steps)
        r.table(steps, fmt="{:.3g}")
    r.save()
    return {"env": env, "attention": attn, "train_step": steps}
