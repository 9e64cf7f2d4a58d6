"""Claim (Table 1 of "Attention Is All You Need"): self-attention needs O(1) sequential operations per layer
where a recurrent layer needs O(n), so at equal parameters a Transformer trains on more tokens per second
than an LSTM, until its O(n²·d) attention term dominates the O(n·d²) of both.

Measured here, side by side in one process, for a Transformer LM and an LSTM LM of (nearly) the same
parameter count, at sequence lengths 64 … 2048:
- training throughput: tokens/s of full optimizer steps (forward, backward, Adam) on batches of a fixed token
  count (tokens_per_batch / n sequences of length n);
- forward latency: one sequence of length n, no gradients — the sequential chain shows here most plainly.
The two models alternate within every repetition, so a change in machine load hits both alike; medians are
reported. A least-squares fit of log(time) on log(n) gives each model's scaling exponent.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from ..bench.measure import interleaved
from ..models.lm import LM, LMConfig
from ..models.rnn import LSTMLM, LSTMLMConfig, match_lstm_width
from ..report import line_plot, markdown_table
from ..run.experiment import ExperimentConfig, experiment

TABLE1 = [
    {"layer": "self-attention", "complexity per layer": "O(n²·d)", "sequential operations": "O(1)",
     "maximum path length": "O(1)"},
    {"layer": "recurrent", "complexity per layer": "O(n·d²)", "sequential operations": "O(n)",
     "maximum path length": "O(n)"},
]


@dataclass
class ParallelConfig(ExperimentConfig):
    lengths: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 1024, 2048])
    """sequence lengths to measure"""
    vocab_size: int = 256
    """vocabulary size of both models"""
    d_model: int = 256
    """Transformer width (its d_ff is 4·d_model)"""
    n_layer: int = 4
    """Transformer layers"""
    n_head: int = 4
    """attention heads of the Transformer"""
    lstm_layers: int = 2
    """the LSTM's width is chosen to match the Transformer's parameter count"""
    tokens_per_batch: int = 4096
    """tokens per training batch (tokens_per_batch / n sequences of length n)"""
    repeats: int = 3
    """timed repetitions per point (the median is kept)"""
    # Torch threads for the sweep (0: torch's default). One thread compares the architectures' work, free of how
    # well each spreads over cores that other jobs may be using; `reference_threads` measures that separately.
    threads: int = 1
    """torch CPU threads for the sweep (0: torch's default)"""
    reference_length: int = 512
    """where the headline ratio is read"""
    reference_threads: list[int] = field(default_factory=lambda: [2])
    """re-measure n=reference_length with these"""


def build_models(cfg: ParallelConfig):
    torch.manual_seed(cfg.seed)
    lm = LM(LMConfig(vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model,
                     max_seq_len=max(cfg.lengths), pos="sinusoidal"))
    target = lm.num_params(non_embedding=False)
    lstm_cfg = lambda w: LSTMLMConfig(vocab_size=cfg.vocab_size, d_model=w, n_layer=cfg.lstm_layers)  # noqa: E731
    width = match_lstm_width(target, lambda w: LSTMLM(lstm_cfg(w)))
    return {"transformer": lm, "lstm": LSTMLM(lstm_cfg(width))}, width


def fit_exponent(ns: list[float], ts: list[float]) -> float:
    """Slope of log t against log n (least squares); NaN with fewer than two lengths."""
    if len(set(ns)) < 2:
        return float("nan")
    lx, ly = [math.log(n) for n in ns], [math.log(t) for t in ts]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def crossing(ns: list[int], a: list[float], b: list[float]) -> float | None:
    """First n (log-interpolated) where a - b changes sign; None when it never does."""
    for i in range(1, len(ns)):
        d0, d1 = math.log(a[i - 1] / b[i - 1]), math.log(a[i] / b[i])
        if d0 == 0:
            return float(ns[i - 1])
        if d0 * d1 < 0:
            f = d0 / (d0 - d1)
            return math.exp(math.log(ns[i - 1]) + f * (math.log(ns[i]) - math.log(ns[i - 1])))
    return None


def flops_per_token(name: str, model, n: int) -> float:
    """Training FLOPs per token (forward + backward ≈ 3 × forward): 6·params plus, for attention,
    the n-dependent scores and weighted sums (2 matmuls of n·d per token per layer, 3× for training)."""
    params = sum(p.numel() for p in model.parameters())
    if name == "lstm":
        return 6.0 * params
    return 6.0 * params + 12.0 * model.cfg.n_layer * model.cfg.d_model * n


@experiment("parallel", ParallelConfig, "training tokens/s and forward latency vs length: Transformer vs LSTM")
def run(cfg: ParallelConfig, ctx) -> dict:
    if cfg.quick:
        cfg = replace(cfg, lengths=[n for n in cfg.lengths if n <= 512] or cfg.lengths[:2], repeats=2,
                      d_model=min(cfg.d_model, 128), tokens_per_batch=min(cfg.tokens_per_batch, 2048))
    default_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads if cfg.threads > 0 else default_threads)
    threads = torch.get_num_threads()
    load_before = _loadavg()
    models, width = build_models(cfg)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    models = {k: m.to(ctx.device) for k, m in models.items()}
    print(f"Transformer {params['transformer']:,} parameters, LSTM (width {width}) {params['lstm']:,}; "
          f"{threads} threads on {ctx.device}")
    rows = []
    for n in cfg.lengths:
        rows += measure(models, n, cfg, ctx.device, threads)
    extra = []
    for th in cfg.reference_threads if ctx.device.type == "cpu" else []:
        torch.set_num_threads(th)
        extra += measure(models, cfg.reference_length, cfg, ctx.device, torch.get_num_threads())
    torch.set_num_threads(default_threads)
    load = {"before": load_before, "after": _loadavg()}
    ctx.report.csv("parallel.csv", rows + extra)
    return _summarise(cfg, ctx, rows, extra, params, width, threads, load)


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def measure(models, n, cfg, device, threads) -> list[dict]:
    """One row per model at length n: medians over repetitions in which the models take turns."""
    g = torch.Generator().manual_seed(n)
    b = max(1, cfg.tokens_per_batch // n)
    x, y = (torch.randint(0, cfg.vocab_size, (b, n), generator=g).to(device) for _ in range(2))
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-4) for k, m in models.items()}

    def train_step(k):
        models[k](x, y)[1].backward()
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)

    for m in models.values():
        m.train()
    train = interleaved({k: partial(train_step, k) for k in models}, cfg.repeats, device, clock_kind="wall")
    for m in models.values():
        m.eval()
    with torch.no_grad():  # a forward pass of one sequence is short and noisy: take several per repetition
        fwd = interleaved({k: partial(m, x[:1]) for k, m in models.items()}, 3 * cfg.repeats, device,
                          clock_kind="wall")
    rows = []
    for k in models:
        t_train, t_fwd = statistics.median(train[k]), statistics.median(fwd[k])
        rows.append({"model": k, "n": n, "threads": threads, "batch": b, "train_step_s": t_train,
                     "train_tokens_per_s": b * n / t_train, "forward_latency_ms": 1000 * t_fwd,
                     "train_gflops_per_s": flops_per_token(k, models[k], n) * b * n / t_train / 1e9})
    t, r = rows
    print(f"n={n:5d} ({threads} threads): tokens/s transformer {t['train_tokens_per_s']:8.0f}  lstm "
          f"{r['train_tokens_per_s']:8.0f} (×{t['train_tokens_per_s'] / r['train_tokens_per_s']:.2f});  forward ms "
          f"{t['forward_latency_ms']:8.1f} vs {r['forward_latency_ms']:8.1f}")
    return rows


def _summarise(cfg, ctx, rows, extra, params, width, threads, load) -> dict:
    ns = cfg.lengths
    col = lambda m, key: [next(r[key] for r in rows if r["model"] == m and r["n"] == n) for n in ns]  # noqa: E731
    tps = {m: col(m, "train_tokens_per_s") for m in ("transformer", "lstm")}
    lat = {m: col(m, "forward_latency_ms") for m in ("transformer", "lstm")}
    # Time per sequence in training: tokens per sequence / tokens per second.
    seq_time = {m: [n / v for n, v in zip(ns, tps[m])] for m in tps}
    fits = {m: {"train_time_per_sequence": fit_exponent(ns, seq_time[m]), "forward_latency": fit_exponent(ns, lat[m]),
                "forward_latency_top_two_lengths": fit_exponent(ns[-2:], lat[m][-2:])}
            for m in tps}
    ratios = [{"n": n, "train_tokens_per_s_ratio": a / b, "forward_latency_ratio_lstm_over_transformer": c / d}
              for n, a, b, c, d in zip(ns, tps["transformer"], tps["lstm"], lat["lstm"], lat["transformer"])]
    ref = next((r for r in ratios if r["n"] == cfg.reference_length), ratios[-1])
    cross_train = crossing(ns, tps["transformer"], tps["lstm"])
    cross_fwd = crossing(ns, lat["transformer"], lat["lstm"])

    tp_plot = line_plot(ctx.out / "train_tokens_per_s.png",
                        {f"{m} ({params[m] / 1e6:.2f}M params)": (ns, tps[m]) for m in tps},
                        xlabel="sequence length n", ylabel="training tokens / s", logx=True, logy=True,
                        title=f"Training throughput at equal parameters ({threads} CPU threads)" if ctx.device.type == "cpu"
                        else "Training throughput at equal parameters")
    lat_plot = line_plot(ctx.out / "forward_latency.png", {m: (ns, lat[m]) for m in lat}, xlabel="sequence length n",
                         ylabel="forward latency, one sequence (ms)", logx=True, logy=True,
                         title="Forward latency vs length")
    r = ctx.report
    r.h("Parallelism: Transformer vs LSTM at equal parameters", 1)
    r.p(f"Transformer LM: {cfg.n_layer} layers, d_model {cfg.d_model}, d_ff {4 * cfg.d_model}, {cfg.n_head} heads, "
        f"exact attention (SDPA), {params['transformer']:,} parameters. LSTM LM: {cfg.lstm_layers} layers of width {width} "
        f"(chosen to match), {params['lstm']:,} parameters. Vocabulary {cfg.vocab_size}, tied embeddings in both. "
        f"Training batches hold {cfg.tokens_per_batch} tokens (⌊{cfg.tokens_per_batch}/n⌋ sequences); forward latency "
        f"is for one sequence. Median of {cfg.repeats} repetitions, models interleaved; device {ctx.device}, "
        f"{threads} torch threads.")
    r.h("Table 1 of the paper, and what this run measured")
    r.table([{**row, "fitted exponent: train time/sequence": f"{fits[m]['train_time_per_sequence']:.2f}",
              "fitted exponent: forward latency": f"{fits[m]['forward_latency']:.2f}"}
             for row, m in zip(TABLE1, ("transformer", "lstm"))])
    r.p("Exponent 1 is linear in n, 2 quadratic. The Transformer's cost mixes O(n·d²) projections with O(n²·d) "
        "attention, so its exponent depends on the range of n against d; its forward-latency exponent over the last two "
        f"lengths is {fits['transformer']['forward_latency_top_two_lengths']:.2f} (LSTM: "
        f"{fits['lstm']['forward_latency_top_two_lengths']:.2f}).")
    r.table(rows, ["model", "n", "batch", "train_step_s", "train_tokens_per_s", "train_gflops_per_s",
                   "forward_latency_ms"], fmt="{:.4g}")
    r.table(ratios, fmt="{:.3g}")
    r.p(f"At n = {ref['n']} ({threads} thread{'s' if threads > 1 else ''}): the Transformer trains on "
        f"{ref['train_tokens_per_s_ratio']:.2f}× the LSTM's tokens/s, and its forward pass over one sequence is "
        f"{ref['forward_latency_ratio_lstm_over_transformer']:.2f}× faster. "
        + " ".join(f"The {what} curves " + (f"cross at n ≈ {x:.0f}." if x else "do not cross in this range.")
                   for what, x in (("training-throughput", cross_train), ("forward-latency", cross_fwd))))
    # `extra` holds a (transformer, lstm) pair of rows per thread count, as `measure` returns them.
    by_threads = [{"threads": t["threads"], "n": t["n"], "transformer_tokens_per_s": t["train_tokens_per_s"],
                   "lstm_tokens_per_s": l["train_tokens_per_s"],
                   "train_ratio": t["train_tokens_per_s"] / l["train_tokens_per_s"],
                   "forward_latency_ratio_lstm_over_transformer": l["forward_latency_ms"] / t["forward_latency_ms"]}
                  for t, l in zip(extra[::2], extra[1::2])]
    if by_threads:
        r.h("More threads, same length")
        r.table(by_threads, fmt="{:.3g}")
        r.p("With more threads, each recurrent step's small matrix product is shared among them and ends in a "
            "synchronisation (n per layer), where the Transformer synchronises once per large operation. On a busy, "
            "shared machine a thread may wait to be scheduled at every synchronisation; read these figures with the "
            "load average below.")
    r.p(f"Load average (1, 5, 15 min) before the run: {load['before']}, after: {load['after']}.")
    r.image(tp_plot, "training throughput")
    r.image(lat_plot, "forward latency")
    r.save()
    print(markdown_table(ratios, fmt="{:.3g}"))
    return {"threads": threads, "params": params, "lstm_width": width,
            "ratio_at_reference": ref, "ratios": ratios, "exponents": fits,
            "crossing_n_train": cross_train, "crossing_n_forward": cross_fwd, "by_threads_at_reference": by_threads,
            "loadavg": load, "rows": rows}
