"""`attnlab bench attention`: forward time, peak memory and output error of every registered attention kernel.

Speed and memory: random Gaussian q, k, v of shape [batch, heads, n, head_dim], forward only (no autograd),
causal and non-causal, for n from 1k up to 131k. A variant stops growing n once its next forward is predicted
(from its last two timings) to exceed `time_limit_s`, or when memory runs out. Exact attention past its
limit gets a fitted c·n² time, flagged `extrapolated` everywhere it appears. Stochastic kernels run in their
"sample" mode when they have one (SSA otherwise runs exact attention in evaluation).
Peak memory: `attnlab.bench.memory.peak_memory` (tensor memory allocated during the call on top of the
inputs; on CPU it sees tensors created by ops, not scratch buffers internal to one op).

Error: ‖o − o_exact‖ / ‖o_exact‖ over the whole output, (a) on the Gaussian inputs of the speed run wherever
exact attention ran, and (b) "at equal sizes": HyperAttention with small blocks and samples (`error_options`)
so it approximates at modest n, against its zero-padding variant and pre-scored variants at an equal key
budget, on Gaussian q/k/v and on q/k/v captured from a trained attnlab LM (`checkpoint`), averaged over seeds.
Exact attention is invariant to a common offset u added to every key (row i's logits all shift by q_i·u·scale);
attended zero keys do not shift with them. So the error study also sweeps such an offset on Gaussian inputs
and on the trained model's q/k/v (`error_offsets`, masked padding against zero padding only), and reports
every source's logit offset q_i·k̄·scale (k̄: the mean key; mean and spread over rows), which places a trained
model's own keys on that sweep.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..attention import build_kernel, kernels
from ..attention.swap import attention_layers
from ..errors import UserError
from ..run.experiment import ExperimentConfig, experiment
from .measure import clock, mean_std, sync
from .memory import peak_memory

PRESCORE_METHODS = ["kmeans", "kmedian", "leverage", "norm"]


@dataclass
class BenchConfig(ExperimentConfig):
    out: str = "runs/bench_attention"
    mechanisms: list[str] = field(default_factory=list)  # registered kernels to run; empty: all of them
    options: dict[str, dict] = field(default_factory=dict)  # per kernel options; default: the kernel's defaults
    prescore: list[str] = field(default_factory=lambda: list(PRESCORE_METHODS))  # hyper+METHOD variants
    prescore_top_k: int = 0  # pre-scored keys, taken out of hyper's sample budget (equal budget); 0: half of it
    lengths: list[int] = field(default_factory=lambda: [1024 * 2**i for i in range(8)])  # 1k .. 131k
    modes: list[str] = field(default_factory=lambda: ["causal", "noncausal"])
    batch: int = 1
    heads: int = 8
    kv_heads: int = 0  # 0: as many as heads
    head_dim: int = 64
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16
    threads: int = 0  # torch CPU threads; 0: torch's default
    repeats: int = 1  # timed forwards per point (the best is kept), after one untimed warm-up per variant
    clock: str = "wall"  # wall | cpu: CPU time of this process (CPU only; with threads=1 it is the wall time an
    #                      idle machine would show, and it does not count time other jobs hold the cores)
    extra: dict[str, dict] = field(default_factory=dict)  # more variants: label -> {"name": kernel, **options}
    time_limit_s: float = 60.0
    max_n: dict[str, int] = field(default_factory=dict)  # per variant label: stop after this length
    memory: bool = True
    seed: int = 0
    error_lengths: list[int] = field(default_factory=lambda: [3000, 6000])  # not multiples of a block
    error_options: dict = field(default_factory=lambda: {"block_size": 64, "sample_size": 64, "min_seq_len": 256})
    error_seeds: int = 3
    # Mean logit offsets mean_i q_i·u·scale of the key-offset sweep (keys shifted along the mean query), run at
    # the first error length (queries given a mean error_query_mean·e along a random unit e: with centred
    # queries the mean of q_i·u would be 0 whatever u is) and on the captured q/k/v.
    error_offsets: list[float] = field(default_factory=lambda: [4.0, 0.0, -2.0, -4.0, -8.0])
    error_query_mean: float = 2.0
    checkpoint: str = ""  # attnlab LM run or checkpoint folder to capture q/k/v from; empty: Gaussian only
    text: str = ""  # the text it reads for the capture; default: its own training data
    capture_len: int = 0  # tokens; 0: the model's max_seq_len
    capture_layer: int = -1  # which attention layer (-1: the last)


@dataclass
class Variant:
    label: str
    name: str
    options: dict
    skip: dict = field(default_factory=dict)  # mode -> reason it stopped growing n
    times: dict = field(default_factory=dict)  # mode -> [(n, seconds)]


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise UserError(f"dtype must be one of {', '.join(table)}, got {name!r}")
    return table[name]


def variants(cfg: BenchConfig, *, error_study: bool = False) -> list[Variant]:
    """Every chosen kernel with its options; hyper also with each pre-scoring method at an equal key budget
    (and, for the error study, with small blocks and as the zero-padding variant)."""
    registry = kernels()
    names = cfg.mechanisms or sorted(registry)
    unknown = sorted(set(names) - set(registry))
    if unknown:
        raise UserError(f"unknown mechanism(s) {', '.join(unknown)}; registered: {', '.join(sorted(registry))}")
    names = ["exact"] + [n for n in names if n != "exact"]  # exact first: the others are measured against it
    out = []
    for name in names:
        opts = dict(cfg.options.get(name, {}))
        if name != "hyper":
            out.append(Variant(name, name, opts))
            continue
        if error_study:
            opts = {**opts, **cfg.error_options}
        out.append(Variant("hyper", name, opts))
        if error_study:
            out.append(Variant("hyper zero-pad", name, {**opts, "zero_pad": True}))
        budget = opts.get("sample_size", build_kernel("hyper", opts).config.sample_size)
        top_k = min(cfg.prescore_top_k or max(1, budget // 2), budget)
        for m in cfg.prescore:
            out.append(Variant(f"hyper+{m}", name, {**opts, "prescore": m, "top_k": top_k, "sample_size": budget - top_k}))
    if not error_study:
        for label, spec in cfg.extra.items():
            spec = dict(spec)
            name = spec.pop("name", None)
            if name not in registry:
                raise UserError(f"extra variant {label!r} needs a registered 'name', got {name!r}")
            out.append(Variant(label, name, spec))
    return out


def _kernel(var: Variant, seed: int | None = None):
    opts = dict(var.options)
    if seed is not None and var.name == "hyper":
        opts["seed"] = seed
    k = build_kernel(var.name, opts)
    if "sample" in k.modes:
        k.set_mode("sample")
    return k.eval()


def _supports(var: Variant, mode: str) -> bool:
    caps = kernels()[var.name].caps
    return caps.causal if mode == "causal" else caps.noncausal


def gaussian_qkv(cfg: BenchConfig, n: int, seed: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hkv = cfg.kv_heads or cfg.heads
    shapes = [(cfg.batch, cfg.heads, n, cfg.head_dim), (cfg.batch, hkv, n, cfg.head_dim), (cfg.batch, hkv, n, cfg.head_dim)]
    return [torch.randn(*s, generator=g).to(device=device, dtype=dtype) for s in shapes]


def offset_qkv(cfg: BenchConfig, n: int, seed: int, device, dtype):
    """Gaussian q, k, v whose queries are moved by a·e (e: a random unit vector, a = cfg.error_query_mean), so
    that a common key offset can shift the mean logit: with centred queries mean_i q_i·u is 0 for every u."""
    if cfg.error_query_mean <= 0:
        raise UserError("error_query_mean must be positive: with centred queries no key offset shifts the mean logit")
    q, k, v = gaussian_qkv(cfg, n, seed, "cpu", torch.float32)
    e = torch.randn(cfg.head_dim, generator=torch.Generator().manual_seed(seed + 1))
    q = q + cfg.error_query_mean * e / e.norm()
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)]


def shift_keys(q: torch.Tensor, k: torch.Tensor, logit_offset: float) -> torch.Tensor:
    """k + u with one u per kv head, along its queries' mean q̄, sized so that mean_i q_i·u·scale = logit_offset
    (row i's own shift q_i·u·scale spreads around that mean). Exact attention does not change."""
    g = q.shape[1] // k.shape[1]
    qbar = q.double().mean(2).view(q.shape[0], k.shape[1], g, -1).mean(2)  # [B, Hkv, D]
    u = qbar * (logit_offset * math.sqrt(q.shape[-1]) / qbar.pow(2).sum(-1, keepdim=True).clamp_min(1e-30))
    return (k.double() + u.unsqueeze(2)).to(k.dtype)


def logit_offset_stats(q: torch.Tensor, k: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation over rows (queries × heads) of q_i·k̄·scale, k̄ = the head's mean key: the
    part of row i's logits that the keys' common component contributes (what attended zero keys lack)."""
    kbar = k.double().mean(2, keepdim=True).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    shift = (q.double() * kbar).sum(-1) / math.sqrt(q.shape[-1])
    return float(shift.mean()), float(shift.std())


def rel_error(o: torch.Tensor, ref: torch.Tensor) -> float:
    return float((o.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _timed(fn, repeats, device, clock_kind="wall"):
    now = clock(clock_kind, device)
    best, out = math.inf, None
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = now()
        out = fn()
        sync(device)
        best = min(best, now() - t0)
    return best, out


def _predict(times: list[tuple[int, float]], n: int) -> float:
    """Next time from the last two points' local exponent (at least 1, at most 2); none measured: 0."""
    if not times:
        return 0.0
    n1, t1 = times[-1]
    p = 2.0
    if len(times) >= 2:
        n0, t0 = times[-2]
        p = min(2.0, max(1.0, math.log(max(t1, 1e-9) / max(t0, 1e-9)) / math.log(n1 / n0)))
    return t1 * (n / n1) ** p


def fit_n2(times: list[tuple[int, float]]) -> float:
    """c of t ≈ c·n², least squares over the measured points: each point weighs as n⁴, so the longest
    lengths (where fixed costs no longer matter) decide it."""
    if not times:
        raise ValueError("no timings to fit")
    return sum(t * n * n for n, t in times) / sum(float(n) ** 4 for n, _ in times)


def speed_rows(cfg: BenchConfig, device, dtype, log=print) -> list[dict]:
    rows = []
    vars_ = variants(cfg)
    for mode in cfg.modes:
        if mode not in ("causal", "noncausal"):
            raise UserError(f"mode must be causal or noncausal, got {mode!r}")
        causal = mode == "causal"
        warm = gaussian_qkv(cfg, min(cfg.lengths), cfg.seed, device, dtype)
        for var in vars_:
            if _supports(var, mode):
                with torch.no_grad():
                    _kernel(var)(*warm, causal=causal)
        for n in sorted(cfg.lengths):
            q, k, v = gaussian_qkv(cfg, n, cfg.seed + n, device, dtype)
            ref = None
            for var in vars_:
                row = {"mode": mode, "n": n, "variant": var.label}
                if not _supports(var, mode):
                    continue
                if mode not in var.skip:
                    predicted = _predict(var.times.get(mode, []), n)
                    if n > cfg.max_n.get(var.label, n):
                        var.skip[mode] = f"max_n {cfg.max_n[var.label]}"
                        log(f"  {mode} n={n} {var.label}: stops ({var.skip[mode]})")
                    elif predicted > cfg.time_limit_s:
                        var.skip[mode] = f"predicted {predicted:.0f} s > {cfg.time_limit_s:.0f} s"
                        log(f"  {mode} n={n} {var.label}: stops ({var.skip[mode]})")
                if mode in var.skip:
                    if var.name == "exact" and var.times.get(mode):
                        c = fit_n2(var.times[mode])
                        rows.append({**row, "time_s": c * n * n, "extrapolated": True,
                                     "note": f"c·n² fitted to {len(var.times[mode])} measured points"})
                    continue
                kern = _kernel(var)
                try:
                    with torch.no_grad():
                        t, o = _timed(lambda: kern(q, k, v, causal=causal), cfg.repeats, device, cfg.clock)
                        mem = None
                        if cfg.memory:
                            _, mem = peak_memory(lambda: kern(q, k, v, causal=causal), device)
                except (MemoryError, torch.OutOfMemoryError, RuntimeError) as e:
                    if isinstance(e, RuntimeError) and "memory" not in str(e).lower():
                        raise
                    var.skip[mode] = "out of memory"
                    log(f"  {mode} n={n} {var.label}: out of memory")
                    continue
                var.times.setdefault(mode, []).append((n, t))
                if var.name == "exact":
                    ref = o
                row.update(time_s=t, extrapolated=False, peak_mem_MB=None if mem is None else mem / 2**20,
                           rel_err_gaussian=None if ref is None else rel_error(o, ref))
                rows.append(row)
                log(f"  {mode} n={n} {var.label}: {t:.3f} s" + (f", {mem / 2**20:.0f} MB" if mem is not None else "")
                    + (f", rel err {row['rel_err_gaussian']:.3g}" if row["rel_err_gaussian"] is not None else ""))
                o = None
            q = k = v = ref = None  # free this length's tensors before the next, longer one is drawn
    _add_speedups(rows)
    return rows


def _add_speedups(rows):
    exact = {(r["mode"], r["n"]): r for r in rows if r["variant"] == "exact"}
    plain = {(r["mode"], r["n"]): r for r in rows if r["variant"] == "hyper" and not r.get("extrapolated")}
    for r in rows:
        e = exact.get((r["mode"], r["n"]))
        if e is not None and r["variant"] != "exact" and not r.get("extrapolated"):
            r["speedup_vs_exact"] = e["time_s"] / r["time_s"]
            r["exact_extrapolated"] = bool(e.get("extrapolated"))
        h = plain.get((r["mode"], r["n"]))
        if h is not None and r["variant"].startswith("hyper+") and not r.get("extrapolated"):
            r["overhead_vs_hyper"] = r["time_s"] / h["time_s"] - 1.0


def capture_qkv(model, idx: torch.Tensor, layer: int = -1):
    """Run `model` on tokens `idx` and return the (q, k, v) that attention layer `layer` hands its kernel
    (after projections, transforms and rotary): the inputs a replacement kernel would see."""
    layers = attention_layers(model)
    if not layers:
        raise UserError("the model has no attention layers")
    target = layers[layer].kernel
    seen = {}

    def hook(_mod, args, kwargs):
        seen["qkv"] = tuple(a.detach().clone() for a in args[:3])
        seen["causal"] = kwargs.get("causal", False)

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(idx)
    finally:
        handle.remove()
    return seen["qkv"], seen["causal"]


def captured_from_checkpoint(cfg: BenchConfig, device):
    """q, k, v of one layer of a trained attnlab LM reading `capture_len` tokens of validation text."""
    from ..data.text import TextCorpus
    from ..run.load import load_run

    run = load_run(cfg.checkpoint)
    model, data = run.model, run.data
    path = cfg.text or data.path
    if not path:
        raise UserError("pass --text: the checkpoint does not name the text it was trained on")
    n = cfg.capture_len or model.cfg.max_seq_len
    if n > model.cfg.max_seq_len:
        if model.cfg.pos != "rope":
            raise UserError(f"capture_len {n} is longer than the model's max_seq_len {model.cfg.max_seq_len}")
        model.cfg.max_seq_len = n  # rotary positions have no table: longer inputs only leave the trained range
    corpus = TextCorpus(path, run.tokenizer, val_fraction=data.val_fraction)
    split = "val" if len(corpus.val) > n else "train"
    x, _ = next(corpus.eval_windows(split, n, 1))
    model.to(device).eval()
    (q, k, v), causal = capture_qkv(model, x.to(device), cfg.capture_layer)
    return q, k, v, causal, f"{cfg.checkpoint} layer {cfg.capture_layer}, {n} tokens of {Path(path).name}"


def error_rows(cfg: BenchConfig, device, dtype, log=print, sources: list | None = None) -> list[dict]:
    """Error at equal sizes on `sources` [(label, (q, k, v)) or (label, (q, k, v), variant labels to run)];
    default: Gaussian at cfg.error_lengths, the key-offset sweep at the first of them (plain hyper and its
    zero-padding variant only), and q/k/v captured from cfg.checkpoint when given."""
    if sources is None:
        sources = [(f"gaussian n={n}", gaussian_qkv(cfg, n, cfg.seed + 7 * n, device, dtype)) for n in cfg.error_lengths]
        designs = {"hyper", "hyper zero-pad"}
        if cfg.error_lengths:
            n = cfg.error_lengths[0]
            q, k, v = offset_qkv(cfg, n, cfg.seed + 7 * n, device, dtype)
            sources += [(f"gaussian n={n}, query mean {cfg.error_query_mean:g}, key offset {off:+g}",
                         (q, shift_keys(q, k, off), v), designs) for off in cfg.error_offsets]
        if cfg.checkpoint:
            # Captured from a causal LM, but valid inputs for both modes.
            q, k, v, _, what = captured_from_checkpoint(cfg, device)
            q, k, v = [t.to(dtype) for t in (q, k, v)]
            sources.append((f"trained LM ({what})", (q, k, v)))
            sources += [(f"trained LM, key offset {off:+g}", (q, shift_keys(q, k, off), v), designs)
                        for off in cfg.error_offsets if off != 0]
    rows = []
    for label, (q, k, v), *only in sources:
        offset, offset_sd = logit_offset_stats(q, k)
        for mode in cfg.modes:
            causal = mode == "causal"
            with torch.no_grad():
                ref, ref_lse = _kernel(Variant("exact", "exact", {}))(q, k, v, causal=causal, return_lse=True)
                masked = {}  # seed -> plain hyper (o, lse), to pair with the zero-padding variant
                for var in variants(cfg, error_study=True):
                    if var.name == "exact" or not _supports(var, mode) or (only and var.label not in only[0]):
                        continue
                    errs, padded = [], []
                    for s in range(cfg.error_seeds):
                        torch.manual_seed(cfg.seed + s)
                        kern = _kernel(var, seed=cfg.seed + s)
                        if var.name == "hyper":
                            o, lse = kern(q, k, v, causal=causal, return_lse=True)
                        else:
                            o, lse = kern(q, k, v, causal=causal), None
                        errs.append(rel_error(o, ref))
                        if var.label == "hyper":
                            masked[s] = (o, lse)
                        elif var.label == "hyper zero-pad" and s in masked:
                            padded.append(_padded_rows_errors(masked[s], (o, lse), (ref, ref_lse)))
                    row = {"source": label, "n": q.shape[2], "mode": mode, "variant": var.label,
                           "mean_logit_offset": offset, "logit_offset_sd": offset_sd,
                           **dict(zip(("rel_err_mean", "rel_err_std"), mean_std(errs))), "seeds": len(errs)}
                    if padded:
                        # Same seed, same draws: the outputs differ exactly on the queries whose block had padding.
                        for i, key in enumerate(("padded_rows_share", "rel_err_padded_rows_masked",
                                                 "rel_err_padded_rows_zero_pad", "lse_err_padded_rows_masked",
                                                 "lse_err_padded_rows_zero_pad")):
                            row[key] = sum(p[i] for p in padded) / len(padded)
                    rows.append(row)
                    log(f"  {label} {mode} {var.label}: rel err {row['rel_err_mean']:.4g} ± {row['rel_err_std']:.2g}"
                        + (f"; rows with padding: rel err masked {row['rel_err_padded_rows_masked']:.4g} / zero-pad "
                           f"{row['rel_err_padded_rows_zero_pad']:.4g}, |lse err| masked "
                           f"{row['lse_err_padded_rows_masked']:.4g} / zero-pad {row['lse_err_padded_rows_zero_pad']:.4g}"
                           if padded else ""))
    return rows


def _padded_rows_errors(masked, zero, exact):
    """On the query rows touched by padding (where the two designs differ): their share, the relative output
    error of the masked and of the zero-padded design, and the mean |lse − lse_exact| of each."""
    (o_m, l_m), (o_z, l_z), (ref, ref_lse) = masked, zero, exact
    hit = (o_m != o_z).any(-1)
    if not bool(hit.any()):
        return 0.0, 0.0, 0.0, 0.0, 0.0
    lse_err = lambda lse: float((lse[hit].double() - ref_lse[hit].double()).abs().mean())  # noqa: E731
    return (float(hit.float().mean()), rel_error(o_m[hit], ref[hit]), rel_error(o_z[hit], ref[hit]),
            lse_err(l_m), lse_err(l_z))


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def _plots(out: Path, rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, ylabel, fname in (("time_s", "forward time (s)", "time.png"), ("peak_mem_MB", "peak memory (MB)", "memory.png")):
        if not any(r.get(key) for r in rows):
            continue
        modes = sorted({r["mode"] for r in rows})
        fig, axes = plt.subplots(1, len(modes), figsize=(6.2 * len(modes), 4.4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            labels = list(dict.fromkeys(r["variant"] for r in rows if r["mode"] == mode))
            for lab in labels:
                pts = [(r["n"], r[key], r.get("extrapolated")) for r in rows
                       if r["mode"] == mode and r["variant"] == lab and r.get(key) is not None]
                meas = [(n, y) for n, y, e in pts if not e]
                extr = [(n, y) for n, y, e in pts if e]
                if meas:
                    line, = ax.plot(*zip(*meas), marker="o", markersize=3, label=lab)
                    if extr:
                        ax.plot(*zip(*([meas[-1]] + extr)), linestyle="--", color=line.get_color(),
                                label=f"{lab} (fitted n², extrapolated)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length n")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / fname
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


@experiment("attention", BenchConfig, "forward time, peak memory and error against exact of every attention mechanism",
            kind="benchmark")
def bench_attention(cfg: BenchConfig, ctx) -> dict:
    """Run the benchmark; writes speed.csv, errors.csv, time.png, memory.png and report.md to ctx.out."""
    out = ctx.out
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no CUDA GPU is available")
    dtype = _dtype(cfg.dtype)
    if cfg.clock not in ("wall", "cpu") or (cfg.clock == "cpu" and device.type != "cpu"):
        raise UserError("clock must be wall, or cpu on a CPU device")
    if not cfg.lengths or min(cfg.lengths) < 1:
        raise UserError("lengths must be positive")
    t0 = time.time()
    print(f"speed and memory on {device}, {torch.get_num_threads()} threads, {cfg.dtype}")
    speed = speed_rows(cfg, device, dtype)
    _write_csv(out / "speed.csv", speed)
    print("error at equal sizes")
    errors = error_rows(cfg, device, dtype)
    if errors:
        _write_csv(out / "errors.csv", errors)
    plots = _plots(out, speed)
    shape = (f"batch {cfg.batch}, {cfg.heads} heads ({cfg.kv_heads or cfg.heads} kv), head dim {cfg.head_dim}, "
             f"{cfg.dtype}, {device}, {torch.get_num_threads()} threads")
    parts = [
        "# Attention benchmark",
        f"Forward pass only, no autograd; {shape}. Times ({'CPU time of the process' if cfg.clock == 'cpu' else 'wall clock'}) "
        f"are the best of {max(1, cfg.repeats)} after a warm-up; "
        f"a variant stops at the first n predicted to exceed {cfg.time_limit_s:.0f} s"
        + (f" or past its max_n {cfg.max_n}" if cfg.max_n else "") + ". Rows marked extrapolated "
        "are exact attention at a fitted c·n², not measurements. Peak memory is the tensor memory the call "
        "allocates on top of its inputs (attnlab.bench.memory). rel_err_gaussian = ‖o − o_exact‖/‖o_exact‖ on "
        "the same Gaussian inputs (near-uniform attention: sampling noise dominates, see the spec).",
        "Variants: " + "; ".join(f"{v.label} = {v.name} {json.dumps(v.options)}" for v in variants(cfg)),
        _table(speed, ["mode", "n", "variant", "time_s", "extrapolated", "speedup_vs_exact", "exact_extrapolated",
                       "overhead_vs_hyper", "peak_mem_MB", "rel_err_gaussian"]),
        *[f"![{p.stem}]({p.name})" for p in plots],
    ]
    if errors:
        ev = variants(cfg, error_study=True)
        parts += ["## Error at equal sizes",
                  f"Relative error against exact attention, mean ± std over {cfg.error_seeds} seeds. Variants: "
                  + "; ".join(f"{v.label} = {v.name} {json.dumps(v.options)}" for v in ev if v.name != "exact"),
                  "For the zero-padding variant (same seeds, so the same draws) the last columns restrict both "
                  "designs to the query rows whose block held padding, the only rows where they differ: relative "
                  "output error, and mean |lse − lse_exact| (the log-normaliser the causal recursion merges with). "
                  "Rows 'key offset L' add one vector u per head to every key, along the mean query, so that the mean "
                  "of q_i·u·scale is L (exact attention is unchanged; attended zero keys fall behind or ahead of the "
                  "real keys by that much); mean_logit_offset / logit_offset_sd: mean and spread over rows of "
                  "q_i·k̄·scale, k̄ the mean key.",
                  _table(errors, ["source", "n", "mode", "variant", "mean_logit_offset", "logit_offset_sd",
                                  "rel_err_mean", "rel_err_std", "padded_rows_share",
                                  "rel_err_padded_rows_masked", "rel_err_padded_rows_zero_pad",
                                  "lse_err_padded_rows_masked", "lse_err_padded_rows_zero_pad"])]
    (out / "report.md").write_text("\n\n".join(parts) + "\n")
    print(f"wrote {out}/report.md")
    return {"threads": torch.get_num_threads(), "speed": speed, "errors": errors}
