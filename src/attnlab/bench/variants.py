"""The configuration of `attnlab bench attention` and the variants it measures.

Variants come from the registry: every chosen mechanism with its options, then whatever its kernel class
offers through `Kernel.bench_variants` (HyperAttention: each pre-scoring method at an equal key budget, and
for the error study the zero-padding design), then the user's `extra` ones. The benchmark never asks which
mechanism it runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..attention import build_kernel, kernels
from ..errors import UserError
from ..run.experiment import ExperimentConfig

REFERENCE = "exact"  # every other variant is measured against it


@dataclass
class BenchConfig(ExperimentConfig):
    out: str = "runs/bench_attention"
    """output folder (must not hold an earlier run)"""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto (CUDA when present)"""
    dtype: str = "float32"
    """dtype of q, k, v: float32, bfloat16, float16, or auto (bfloat16 on CUDA)"""
    mechanisms: list[str] = field(default_factory=list)
    """registered kernels to run; empty: all of them"""
    options: dict[str, dict] = field(default_factory=dict)
    """per kernel options, e.g. {"hyper": {"block_size": 128}}; default: the kernel's defaults"""
    variants: list[str] | None = None
    """variants the mechanisms offer beyond themselves to run, by label (e.g. hyper+norm, hyper zero-pad);
    null: all of them, []: none"""
    lengths: list[int] = field(default_factory=lambda: [1024 * 2**i for i in range(8)])
    """sequence lengths of the speed run (default 1k .. 131k)"""
    modes: list[str] = field(default_factory=lambda: ["causal", "noncausal"])
    """causal and/or noncausal"""
    batch: int = 1
    """batch size"""
    heads: int = 8
    """query heads"""
    kv_heads: int = 0
    """key/value heads; 0: as many as heads"""
    head_dim: int = 64
    """dimension per head"""
    threads: int = 0
    """torch CPU threads; 0: torch's default"""
    repeats: int = 1
    """timed forwards per point (the best is kept), after one untimed warm-up per variant"""
    clock: str = "wall"
    """wall, cpu (CPU time of this process; CPU only: with threads=1 it is the wall time an idle machine would
    show, without the time other jobs hold the cores) or auto"""
    extra: dict[str, dict] = field(default_factory=dict)
    """more variants: label -> {"name": kernel, **options}"""
    time_limit_s: float = 60.0
    """a variant stops growing n once its next forward is predicted to take longer"""
    max_n: dict[str, int] = field(default_factory=dict)
    """per variant label: stop after this length"""
    memory: bool = True
    """measure peak memory"""
    error_lengths: list[int] = field(default_factory=lambda: [3000, 6000])
    """lengths of the error study on Gaussian q/k/v (not multiples of a block)"""
    error_options: dict[str, dict] = field(default_factory=dict)
    """per kernel options of the error study, on top of `options`; default: the kernel's small_options (sizes
    at which it approximates at these lengths)"""
    error_seeds: int = 3
    """seeds the error study averages over"""
    error_offsets: list[float] = field(default_factory=lambda: [4.0, 0.0, -2.0, -4.0, -8.0])
    """mean logit offsets mean_i q_i·u·scale of the key-offset sweep (keys shifted along the mean query), run at
    the first error length and on the captured q/k/v"""
    error_query_mean: float = 2.0
    """the sweep's Gaussian queries get a mean error_query_mean·e along a random unit e (with centred queries the
    mean of q_i·u is 0 whatever u is)"""
    checkpoint: str = ""
    """attnlab LM run or checkpoint folder to capture q/k/v from; empty: Gaussian only"""
    text: str = ""
    """the text read for the capture; default: the checkpoint's training data"""
    capture_len: int = 0
    """tokens of the capture; 0: the model's max_seq_len"""
    capture_layer: int = -1
    """which attention layer to capture (-1: the last)"""


@dataclass
class Variant:
    label: str
    name: str
    options: dict
    base: str | None = None  # label of the mechanism a derived variant varies
    pair: tuple[str, str, str] | None = None  # Kernel.paired_designs entry of a derived variant
    skip: dict = field(default_factory=dict)  # mode -> reason it stopped growing n
    times: dict = field(default_factory=dict)  # mode -> [(n, seconds)]


def variants(cfg: BenchConfig, study: str = "speed") -> list[Variant]:
    """The reference first, then every chosen kernel followed by the variants its class offers for `study`
    ("speed" or "error"); the speed study adds cfg.extra."""
    registry = kernels()
    names = cfg.mechanisms or sorted(registry)
    unknown = sorted((set(names) | set(cfg.options) | set(cfg.error_options)) - set(registry))
    if unknown:
        raise UserError(f"unknown mechanism(s) {', '.join(unknown)}; registered: {', '.join(sorted(registry))}")
    names = [REFERENCE] + [n for n in names if n != REFERENCE]
    out = []
    for name in names:
        cls = registry[name].cls
        opts = dict(cfg.options.get(name, {}))
        if study == "error":
            opts = {**opts, **cfg.error_options.get(name, cls.small_options)}
        out.append(Variant(name, name, opts))
        for suffix, vopts in cls.bench_variants(opts, study).items():
            if cfg.variants is None or name + suffix in cfg.variants:
                out.append(Variant(name + suffix, name, vopts, base=name, pair=cls.paired_designs.get(suffix)))
    if study == "speed":
        for label, spec in cfg.extra.items():
            spec = dict(spec)
            name = spec.pop("name", None)
            if name not in registry:
                raise UserError(f"extra variant {label!r} needs a registered 'name', got {name!r}")
            out.append(Variant(label, name, spec))
    return out


def check_variant_labels(cfg: BenchConfig) -> None:
    if cfg.variants is None:
        return
    everyone = dataclasses.replace(cfg, variants=None)
    offered = {v.label for study in ("speed", "error") for v in variants(everyone, study) if v.base}
    unknown = sorted(set(cfg.variants) - offered)
    if unknown:
        raise UserError(f"unknown variant(s) {', '.join(unknown)}; offered: {', '.join(sorted(offered)) or 'none'}")


def build_variant(var: Variant, seed: int | None = None):
    """The variant's kernel in evaluation, in its "sample" mode where it has one (stochastic kernels would
    otherwise run exact attention); `seed` goes to kernels whose config takes one."""
    entry = kernels()[var.name]
    opts = dict(var.options)
    if seed is not None and "seed" in {f.name for f in dataclasses.fields(entry.config_cls)}:
        opts["seed"] = seed
    k = build_kernel(var.name, opts)
    if "sample" in k.modes:
        k.set_mode("sample")
    return k.eval()


def supports(var: Variant, mode: str) -> bool:
    caps = kernels()[var.name].caps
    return caps.causal if mode == "causal" else caps.noncausal


def gaussian_qkv(cfg: BenchConfig, n: int, seed: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hkv = cfg.kv_heads or cfg.heads
    shapes = [(cfg.batch, cfg.heads, n, cfg.head_dim), (cfg.batch, hkv, n, cfg.head_dim), (cfg.batch, hkv, n, cfg.head_dim)]
    return [torch.randn(*s, generator=g).to(device=device, dtype=dtype) for s in shapes]


def rel_error(o: torch.Tensor, ref: torch.Tensor) -> float:
    return float((o.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def describe(vs: list[Variant]) -> str:
    import json

    return "; ".join(f"{v.label} = {v.name} {json.dumps(v.options)}" for v in vs)
