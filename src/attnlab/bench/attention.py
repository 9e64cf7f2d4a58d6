"""`attnlab bench attention`: forward time, peak memory and output error of every registered attention kernel.

Speed and memory: random Gaussian q, k, v of shape [batch, heads, n, head_dim], forward only (no autograd),
causal and non-causal, for n from 1k up to 131k, for every variant of `bench.variants` (each mechanism and
the variants its kernel class offers). A variant stops growing n once its next forward is predicted (from
its last two timings) to exceed `time_limit_s`, or when memory runs out. Exact attention past its limit gets
a fitted c·n² time, flagged `extrapolated` everywhere it appears. Stochastic kernels run in their "sample"
mode when they have one (SSA otherwise runs exact attention in evaluation). Every variant gets its speed-up
over exact attention, and a derived variant its overhead over the mechanism it varies (`overhead_vs_NAME`).
Peak memory: `attnlab.bench.memory.peak_memory` (tensor memory allocated during the call on top of the
inputs; on CPU it sees tensors created by ops, not scratch buffers internal to one op).

Error at equal sizes: `bench.errors`.
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..report import figure
from ..run.experiment import experiment
from .errors import error_rows
from .measure import clock, sync
from .memory import peak_memory
from .variants import (
    REFERENCE,
    BenchConfig,
    build_variant,
    check_variant_labels,
    describe,
    gaussian_qkv,
    rel_error,
    supports,
    variants,
)


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
            if supports(var, mode):
                with torch.no_grad():
                    build_variant(var)(*warm, causal=causal)
        for n in sorted(cfg.lengths):
            q, k, v = gaussian_qkv(cfg, n, cfg.seed + n, device, dtype)
            ref = None
            for var in vars_:
                row = {"mode": mode, "n": n, "variant": var.label}
                if not supports(var, mode):
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
                    if var.label == REFERENCE and var.times.get(mode):
                        c = fit_n2(var.times[mode])
                        rows.append({**row, "time_s": c * n * n, "extrapolated": True,
                                     "note": f"c·n² fitted to {len(var.times[mode])} measured points"})
                    continue
                kern = build_variant(var)
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
                if var.label == REFERENCE:
                    ref = o
                row.update(time_s=t, extrapolated=False, peak_mem_MB=None if mem is None else mem / 2**20,
                           rel_err_gaussian=None if ref is None else rel_error(o, ref))
                rows.append(row)
                log(f"  {mode} n={n} {var.label}: {t:.3f} s" + (f", {mem / 2**20:.0f} MB" if mem is not None else "")
                    + (f", rel err {row['rel_err_gaussian']:.3g}" if row["rel_err_gaussian"] is not None else ""))
                o = None
            q = k = v = ref = None  # free this length's tensors before the next, longer one is drawn
    _add_ratios(rows, vars_)
    return rows


def _add_ratios(rows, vars_):
    """speedup_vs_exact of every measured variant; overhead_vs_BASE of a derived variant over its mechanism."""
    at = {(r["mode"], r["n"], r["variant"]): r for r in rows}
    bases = {v.label: v.base for v in vars_ if v.base}
    for r in rows:
        if r.get("extrapolated"):
            continue
        e = at.get((r["mode"], r["n"], REFERENCE))
        if e is not None and r["variant"] != REFERENCE:
            r["speedup_vs_exact"] = e["time_s"] / r["time_s"]
            r["exact_extrapolated"] = bool(e.get("extrapolated"))
        base = bases.get(r["variant"])
        b = at.get((r["mode"], r["n"], base))
        if b is not None and not b.get("extrapolated"):
            r[f"overhead_vs_{base}"] = r["time_s"] / b["time_s"] - 1.0


def _plot(path, rows: list[dict], key: str, ylabel: str):
    """One panel per mode, a line per variant; exact attention's fitted times dashed."""
    modes = sorted({r["mode"] for r in rows})

    def draw(fig, plt):
        for i, mode in enumerate(modes):
            ax = fig.add_subplot(1, len(modes), i + 1)
            for lab in dict.fromkeys(r["variant"] for r in rows if r["mode"] == mode):
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
            ax.set(yscale="log", xlabel="sequence length n", ylabel=ylabel, title=mode)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)

    return figure(path, draw, size=(6.2 * len(modes), 4.4))


@experiment("attention", BenchConfig, "forward time, peak memory and error against exact of every attention mechanism",
            kind="benchmark")
def bench_attention(cfg: BenchConfig, ctx) -> dict:
    """Run the benchmark; writes speed.csv, errors.csv, time.png, memory.png and report.md to ctx.out."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, dtype = ctx.device, ctx.amp or torch.float32
    clock(cfg.clock, device)  # refuses a clock the device cannot have before anything runs
    if not cfg.lengths or min(cfg.lengths) < 1:
        raise UserError("lengths must be positive")
    check_variant_labels(cfg)
    print(f"speed and memory on {device}, {torch.get_num_threads()} threads, {dtype}")
    speed = speed_rows(cfg, device, dtype)
    ctx.report.csv("speed.csv", speed)
    print("error at equal sizes")
    errors = error_rows(cfg, device, dtype)
    if errors:
        ctx.report.csv("errors.csv", errors)
    plots = [_plot(ctx.out / fname, speed, key, ylabel)
             for key, ylabel, fname in (("time_s", "forward time (s)", "time.png"),
                                        ("peak_mem_MB", "peak memory (MB)", "memory.png"))
             if any(r.get(key) for r in speed)]
    r = ctx.report
    shape = (f"batch {cfg.batch}, {cfg.heads} heads ({cfg.kv_heads or cfg.heads} kv), head dim {cfg.head_dim}, "
             f"{str(dtype).removeprefix('torch.')}, {device}, {torch.get_num_threads()} threads")
    r.h("Attention benchmark", 1)
    r.p(f"Forward pass only, no autograd; {shape}. Times ({'CPU time of the process' if cfg.clock == 'cpu' else 'wall clock'}) "
        f"are the best of {max(1, cfg.repeats)} after a warm-up; "
        f"a variant stops at the first n predicted to exceed {cfg.time_limit_s:.0f} s"
        + (f" or past its max_n {cfg.max_n}" if cfg.max_n else "") + ". Rows marked extrapolated "
        "are exact attention at a fitted c·n², not measurements. Peak memory is the tensor memory the call "
        "allocates on top of its inputs (attnlab.bench.memory). rel_err_gaussian = ‖o − o_exact‖/‖o_exact‖ on "
        "the same Gaussian inputs (near-uniform attention: sampling noise dominates, see the spec). "
        "overhead_vs_NAME: time of a variant over that of the mechanism NAME it varies, minus 1.")
    r.p("Variants: " + describe(variants(cfg)))
    overheads = [c for c in dict.fromkeys(k for row in speed for k in row) if c.startswith("overhead_vs_")]
    r.table(speed, ["mode", "n", "variant", "time_s", "extrapolated", "speedup_vs_exact", "exact_extrapolated",
                    *overheads, "peak_mem_MB", "rel_err_gaussian"])
    for p in plots:
        r.image(p, p.stem)
    if errors:
        ev = [v for v in variants(cfg, "error") if v.label != REFERENCE]
        pairs = "; ".join(f"{v.label} against {v.base} ({v.pair[1]} → {v.pair[2]} on the {v.pair[0].replace('_', ' ')})"
                          for v in ev if v.pair)
        head = ["source", "n", "mode", "variant", "mean_logit_offset", "logit_offset_sd", "rel_err_mean", "rel_err_std"]
        r.h("Error at equal sizes")
        r.p(f"Relative error against exact attention, mean ± std over {cfg.error_seeds} seeds. Variants: "
            + describe(ev))
        r.p("A paired design (same seeds, so the same draws as its mechanism) is compared on the query rows where "
            "the two differ, the last columns: their share, the relative output error of each design there, and "
            "mean |lse − lse_exact| (the log-normaliser the causal recursion merges with)"
            + (f". Pairs: {pairs}" if pairs else "") + ". Rows 'key offset L' add one vector u per head to every "
            "key, along the mean query, so that the mean of q_i·u·scale is L (exact attention is unchanged; "
            "attended zero keys fall behind or ahead of the real keys by that much); mean_logit_offset / "
            "logit_offset_sd: mean and spread over rows of q_i·k̄·scale, k̄ the mean key.")
        r.table(errors, head + [c for c in dict.fromkeys(k for row in errors for k in row) if c not in head + ["seeds"]])
    print(f"wrote {r.save()}")
    return {"threads": torch.get_num_threads(), "speed": speed, "errors": errors}
