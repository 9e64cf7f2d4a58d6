"""Forecasting with swappable attention: the patch Transformer with exact, KV-shift, SSA and hyper attention
against last value, seasonal naive, DLinear and an LSTM, on built-in series and any `--data FILE`.

1. Accuracy. Every trained model (each mechanism, DLinear, LSTM) is trained for the longest horizon with
   `seeds` seeds and scored on every test window over the first h steps, for each h in `horizons`: MSE and
   MAE on the standardised series and in original units, mean ± std over seeds. Last value and seasonal
   naive (period: the series' own, else estimated on the training split) are scored on the same windows.
   The claims checked: each Transformer beats both naive baselines at every horizon (every seed's MSE is
   lower), and how it compares with DLinear (mean ± std; "within noise" when the intervals overlap).
2. Speed. One training step and one forecast at look-backs up to `speed_lookbacks` (random windows), exact
   vs hyper vs SSA side by side in this process (`experiments.forecast_speed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..attention import AttentionSpec
from ..bench.measure import mean_std
from ..errors import UserError
from ..report import figure, line_plot
from ..run.experiment import ExperimentConfig, experiment
from ..run.forecast import (
    ForecastDataConfig,
    ForecastModelConfig,
    ForecastRunConfig,
    build,
    evaluate_table,
)
from ..tasks.forecast import forecast_png, make_forecast
from ..training import OptimConfig, TrainConfig
from .forecast_speed import SpeedPlan, crossovers, lookback_speed, speed_plots

MODELS = ("exact", "kv_shift", "ssa", "hyper", "dlinear", "lstm")
NAIVE = ("last_value", "seasonal_naive")


@dataclass
class ForecastExperimentConfig(ExperimentConfig):
    builtins: list[str] = field(default_factory=lambda: ["co2"])
    """built-in series to run on (see attnlab.data.timeseries.BUILTINS)"""
    data: str = ""
    """a .csv/.tsv/.parquet series to run on as well"""
    columns: list[str] = field(default_factory=list)
    """target columns of --data (empty: every numeric one)"""
    time_column: str | None = None
    """time column of --data"""
    lookback: int = 336
    """input points per window"""
    horizons: list[int] = field(default_factory=lambda: [24, 48, 96, 192])
    """horizons reported; the models predict the longest"""
    models: list[str] = field(default_factory=lambda: list(MODELS))
    """trained models: exact, kv_shift, ssa, hyper (the Transformer with that attention), dlinear, lstm"""
    seeds: int = 3
    """seeds per trained model (seed, seed + 1, ...)"""
    steps: int = 500
    """training steps per model"""
    batch_size: int = 32
    """windows per training batch"""
    lr_grid: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    """peak learning rates tried (AdamW, cosine to lr/20); each family keeps the one with the lowest validation
    MSE (first seed)"""
    n_layer: int = 2
    """Transformer encoder blocks"""
    n_head: int = 4
    """Transformer heads"""
    d_model: int = 64
    """Transformer width"""
    patch_len: int = 16
    """Transformer patch length"""
    stride: int = 8
    """Transformer patch stride"""
    dropout: float = 0.1
    """Transformer dropout"""
    lstm_hidden: int = 64
    """LSTM hidden size (one layer)"""
    ssa: dict = field(default_factory=lambda: {"factor": 4})
    """SSA options for the accuracy runs"""
    hyper: dict = field(default_factory=lambda: {"block_size": 8, "sample_size": 8, "min_seq_len": 16, "lsh_bits": 3})
    """hyper options for the accuracy runs, small enough to approximate at a few dozen patches"""
    speed_lookbacks: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192, 16384, 32768])
    """look-backs of the speed sweep (empty: skip it)"""
    speed_patch: int = 8
    """patch length (= stride) in the speed sweep: look-back / patch tokens"""
    speed_batch: int = 4
    """windows per step in the speed sweep"""
    speed_rounds: int = 3
    """timed turns per look-back"""
    speed_hyper: dict = field(default_factory=lambda: {"block_size": 64, "sample_size": 64, "min_seq_len": 256,
                                                       "lsh_bits": 6})
    """hyper options in the speed sweep"""
    speed_ssa: dict = field(default_factory=lambda: {"factor": 8})
    """SSA options in the speed sweep"""


def _quick(cfg: ForecastExperimentConfig) -> ForecastExperimentConfig:
    return replace(cfg, lookback=64, horizons=[8, 16], seeds=1, lr_grid=cfg.lr_grid[:2], steps=4, batch_size=8, n_layer=1, d_model=16,
                   patch_len=8, stride=8, lstm_hidden=8, speed_lookbacks=[64, 128] if cfg.speed_lookbacks else [],
                   speed_rounds=1, speed_batch=2, speed_hyper={**cfg.speed_hyper, "block_size": 8, "sample_size": 8, "min_seq_len": 8})


def base(cfg: ForecastExperimentConfig, source: str, columns: list[str], time_column: str | None,
         seed: int) -> ForecastRunConfig:
    """The Transformer with exact attention on `source`, trained for the longest horizon."""
    model = ForecastModelConfig(patch_len=cfg.patch_len, stride=cfg.stride, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                d_model=cfg.d_model, dropout=cfg.dropout)
    data = ForecastDataConfig(source=source, columns=list(columns), time_column=time_column, lookback=cfg.lookback,
                              horizon=max(cfg.horizons), horizons=list(cfg.horizons))
    train = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, eval_every=cfg.steps if cfg.quick else max(1, cfg.steps // 5), log_every=50,
                        seed=seed, keep_checkpoints=1, progress=False, tensorboard=False)
    lr = cfg.lr_grid[0]
    optim = OptimConfig(lr=lr, min_lr=lr / 20, warmup_steps=max(1, cfg.steps // 20), weight_decay=0.01)
    return ForecastRunConfig(out="", model=model, data=data, train=train, optim=optim)


def variant(run: ForecastRunConfig, cfg: ForecastExperimentConfig, name: str) -> ForecastRunConfig:
    m = run.model
    changes = {
        "exact": {},
        "kv_shift": {"attention": AttentionSpec(transform="kv_shift")},
        "ssa": {"attention": AttentionSpec(name="ssa", options=dict(cfg.ssa))},
        "hyper": {"attention": AttentionSpec(name="hyper", options=dict(cfg.hyper))},
        "dlinear": {"kind": "dlinear"},
        "lstm": {"kind": "lstm", "hidden": cfg.lstm_hidden, "lstm_layers": 1, "dropout": 0.0},
    }[name]
    return replace(run, model=replace(m, **changes))


def _check(cfg: ForecastExperimentConfig) -> list[tuple[str, list[str], str | None]]:
    bad = [m for m in cfg.models if m not in MODELS]
    if bad or not cfg.models:
        raise UserError(f"unknown model(s) {bad}; choose from {', '.join(MODELS)}")
    if cfg.seeds < 1 or cfg.steps < 1 or not cfg.horizons or min(cfg.horizons) < 1:
        raise UserError("seeds and steps must be at least 1, horizons positive")
    if not cfg.lr_grid or min(cfg.lr_grid) <= 0:
        raise UserError("lr_grid must list positive learning rates")
    sources = [(f"builtin:{b}", [], None) for b in cfg.builtins] + ([(cfg.data, list(cfg.columns), cfg.time_column)]
                                                                  if cfg.data else [])
    if not sources:
        raise UserError("nothing to run on: name --builtins or --data FILE")
    if any(L < cfg.speed_patch for L in cfg.speed_lookbacks):
        raise UserError(f"speed_lookbacks must be at least speed_patch={cfg.speed_patch}")
    return sources


def _fmt(xs: list[float]) -> str:
    m, s = mean_std(xs)
    return f"{m:.4g} ± {s:.2g}" if len(xs) > 1 else f"{m:.4g}"


def family(name: str) -> str:
    """Models that share a tuned learning rate: every attention mechanism takes the Transformer's."""
    return name if name in ("dlinear", "lstm") else "transformer"


def accuracy(cfg: ForecastExperimentConfig, ctx, source: str, columns, time_column):
    """Raw rows (one per model, seed and horizon; baselines once), the learning-rate search, and the trained
    models of the first seed.

    Each family (the Transformer, DLinear, the LSTM) gets the learning rate of `lr_grid` with the lowest
    validation MSE for the first seed, the Transformer's found with the first mechanism listed; the test
    split is never looked at to choose."""
    first = base(cfg, source, columns, time_column, cfg.seed)
    series = first.data.load()
    tag = source.split(":", 1)[1] if source.startswith("builtin:") else "data"
    rows, kept, search, chosen = [], {}, [], {}

    def fit(name, seed, lr):
        run = variant(base(cfg, source, columns, time_column, seed), cfg, name)
        run = replace(run, optim=replace(run.optim, lr=lr, min_lr=lr / 20))
        built = build(run, series=series)
        print(f"== {tag} {name} seed {seed} lr {lr:g}: {built.model.num_params():,} parameters", flush=True)
        label = f"{tag}/{name}-seed{seed}" + (f"-lr{lr:g}" if len(cfg.lr_grid) > 1 else "")
        model, _, res = ctx.train(built.config, label, model=built.model, task=built.task, record=True)
        model.eval()
        test = [x for x in evaluate_table(model, series, built.config.data, "test", device=ctx.device, name=name)
                if x["model"] == name]
        print(f"   val mse {res.final['val_loss']:.4f}; test " + ", ".join(f"h{x['horizon']} mse {x['mse']:.4f}"
                                                                       for x in test), flush=True)
        return model, res.final["val_loss"], [{"source": source, "seed": seed, "lr": lr, "step_s": res.step_s, **x}
                                              for x in test]

    for name in cfg.models:
        fam = family(name)
        if fam not in chosen:
            tried = {lr: fit(name, cfg.seed, lr) for lr in cfg.lr_grid}
            best = min(tried, key=lambda lr: tried[lr][1])
            chosen[fam] = best
            search += [{"source": source, "family": fam, "model": name, "lr": lr, "val_mse": v[1], "chosen": lr == best}
                       for lr, v in tried.items()]
            kept[name], rows = tried[best][0], rows + tried[best][2]
        else:
            model, _, r = fit(name, cfg.seed, chosen[fam])
            kept[name], rows = model, rows + r
        for i in range(1, cfg.seeds):
            rows += fit(name, cfg.seed + i, chosen[fam])[2]
    naive = [x for x in evaluate_table(kept[cfg.models[0]], series, first.data, "test", device=ctx.device)
             if x["model"] in NAIVE]
    rows += [{"source": source, "seed": None, "lr": None, "step_s": None, **x} for x in naive]
    return rows, search, {"series": series, "models": kept, "data": first.data, "lr": chosen}


def tables(rows: list[dict], models: list[str], horizons: list[int]) -> tuple[dict[int, list[dict]], dict]:
    """Per horizon, one row per model with mean ± std over seeds, and the claims."""
    out, claims = {}, {"beats_naive_every_horizon": {}, "vs_dlinear": {}}
    for h in horizons:
        at = [r for r in rows if r["horizon"] == h]
        naive = {r["model"]: r for r in at if r["model"] in NAIVE}
        table = []
        for name in [*models, *NAIVE]:
            mine = [r for r in at if r["model"] == name]
            if not mine:
                continue
            mse = [r["mse"] for r in mine]
            row = {"model": name, "seeds": len(mine) if mine[0]["seed"] is not None else "-",
                   "MSE": _fmt(mse), "MAE": _fmt([r["mae"] for r in mine]),
                   "MSE (orig)": _fmt([r["mse_orig"] for r in mine]), "MAE (orig)": _fmt([r["mae_orig"] for r in mine]),
                   "mse_mean": mean_std(mse)[0], "mse_std": mean_std(mse)[1]}
            for b in NAIVE:
                row[f"/ {b}"] = mean_std(mse)[0] / naive[b]["mse"]
            table.append(row)
            if name not in NAIVE:
                claims["beats_naive_every_horizon"].setdefault(name, True)
                if not all(m < naive[b]["mse"] for m in mse for b in NAIVE):
                    claims["beats_naive_every_horizon"][name] = False
        out[h] = table
        dl = next((t for t in table if t["model"] == "dlinear"), None)
        if dl is not None:
            for t in table:
                if t["model"] in ("exact", "kv_shift", "ssa", "hyper"):
                    lo, hi = t["mse_mean"] - t["mse_std"], t["mse_mean"] + t["mse_std"]
                    dlo, dhi = dl["mse_mean"] - dl["mse_std"], dl["mse_mean"] + dl["mse_std"]
                    verdict = "better" if hi < dlo else "worse" if lo > dhi else "within noise"
                    claims["vs_dlinear"].setdefault(t["model"], {})[h] = {
                        "transformer": t["MSE"], "dlinear": dl["MSE"], "verdict": verdict}
    return out, claims


@experiment("forecast", ForecastExperimentConfig,
            "forecasting: Transformer (exact, kv_shift, ssa, hyper) vs naive, DLinear and LSTM; speed vs look-back")
def run(cfg: ForecastExperimentConfig, ctx) -> dict:
    if cfg.quick:
        cfg = _quick(cfg)
    sources = _check(cfg)
    results, all_rows, all_search = {}, [], []
    for source, columns, time_column in sources:
        rows, search, kept = accuracy(cfg, ctx, source, columns, time_column)
        all_rows, all_search = all_rows + rows, all_search + search
        results[source] = (tables(rows, cfg.models, sorted(cfg.horizons)), kept, search)
    ctx.report.csv("accuracy.csv", all_rows)
    ctx.report.csv("lr_search.csv", all_search)

    speed, plan = [], None
    if cfg.speed_lookbacks:
        specs = {"exact": AttentionSpec(), "hyper": AttentionSpec(name="hyper", options=dict(cfg.speed_hyper)),
                 "ssa": AttentionSpec(name="ssa", options=dict(cfg.speed_ssa))}
        plan = SpeedPlan(sorted(cfg.speed_lookbacks), specs, patch_len=cfg.speed_patch, batch_size=cfg.speed_batch,
                         rounds=cfg.speed_rounds, seed=cfg.seed, horizon=max(cfg.horizons))
        print(f"== speed: look-backs {plan.lookbacks}", flush=True)
        speed = lookback_speed(plan, ctx.device)
        ctx.report.csv("speed.csv", speed)
    return _write(cfg, ctx, results, speed, plan)


def _write(cfg, ctx, results, speed, plan) -> dict:
    r = ctx.report
    r.h("Forecasting with swappable attention", 1)
    r.p(f"Look-back {cfg.lookback}; each trained model predicts {max(cfg.horizons)} steps and is scored on the first "
        f"h of every test window. Transformer: {cfg.n_layer} layers, d {cfg.d_model}, {cfg.n_head} heads, patch "
        f"{cfg.patch_len}/stride {cfg.stride}, RevIN; SSA {cfg.ssa} (exact attention in evaluation, its own "
        f"mode); hyper {cfg.hyper} (approximate in evaluation too). DLinear kernel 25; LSTM one layer of "
        f"{cfg.lstm_hidden}. {cfg.steps} steps of AdamW (cosine), batch {cfg.batch_size}, "
        f"{cfg.seeds} seed(s). MSE/MAE on the standardised series (training-split scaler), and in original units; "
        f"mean ± std over seeds. `/ baseline`: mean MSE over the baseline's. Device {ctx.device}"
        f"{', quick run' if cfg.quick else ''}.")
    summary = {"sources": {}}
    cols = ["model", "seeds", "MSE", "MAE", "MSE (orig)", "MAE (orig)", "/ last_value", "/ seasonal_naive"]
    for source, ((per_h, claims), kept, search) in results.items():
        tag = source.split(":", 1)[1] if source.startswith("builtin:") else "data"
        series, data = kept["series"], kept["data"]
        sn = next(iter(per_h.values()))
        r.h(f"{source}: {len(series)} points, columns {', '.join(series.columns)}", 2)
        r.p("Learning rate per family, chosen on the validation split (first seed): "
            + "; ".join(f"{fam} {lr:g}" for fam, lr in kept["lr"].items()) + ".")
        if len(cfg.lr_grid) > 1:
            r.table(search, ["family", "model", "lr", "val_mse", "chosen"], fmt="{:.4g}")
        for h, table in per_h.items():
            r.h(f"horizon {h}", 3)
            r.table(table, cols, fmt="{:.3f}")
        r.h("Claims", 3)
        r.table([{"model": m, "beats last value and seasonal naive at every horizon (every seed)": v}
                 for m, v in claims["beats_naive_every_horizon"].items()])
        if claims["vs_dlinear"]:
            r.p("Transformer against DLinear, test MSE mean ± std over seeds: better / worse when the two "
                "mean ± std intervals do not overlap, else within noise.")
            r.table([{"model": m, **{f"h{h}": f"{v['verdict']} ({v['transformer']} vs {v['dlinear']})"
                                     for h, v in by_h.items()}} for m, by_h in claims["vs_dlinear"].items()])
        hs = sorted(per_h)
        curves = {t["model"]: (hs, [next(x["mse_mean"] for x in per_h[h] if x["model"] == t["model"]) for h in hs])
                  for t in sn}
        plots = [line_plot(ctx.out / f"{tag}_mse_by_horizon.png", curves, xlabel="horizon (steps)", logy=True,
                           ylabel="test MSE (standardised, mean over seeds)", title=f"{source}: error by horizon")]
        plots.append(_example(ctx, series, kept["models"], data, tag))
        for p in plots:
            r.image(p, p.stem)
        summary["sources"][source] = {"claims": claims, "lr": kept["lr"], "lr_search": search, "tables": {h: [{k: v for k, v in t.items()} for t in tab]
                                                                  for h, tab in per_h.items()}}
    if speed:
        ref = next(iter(plan.mechanisms))
        cross = crossovers(speed, ref)
        r.h("Training and forecast time against look-back", 2)
        r.p(f"Random windows, batch {plan.batch_size}, patch {plan.patch_len} = stride (tokens ≈ look-back / "
            f"{plan.patch_len}), {plan.n_layer} layers, d {plan.d_model}; hyper {cfg.speed_hyper}, SSA "
            f"{cfg.speed_ssa} (SSA subsamples in training only; its forecasts run exact attention). Median of "
            f"{plan.rounds} turns in one process. Memory: peak tensor MB of a training forward, activations kept for "
            f"backward included (weights, gradients and optimizer state excluded), and of a forecast.")
        r.table(speed, ["lookback", "tokens", "mechanism", "train_s", "infer_s", f"train_vs_{ref}", f"infer_vs_{ref}",
                        "train_act_MB", "infer_peak_MB"], fmt="{:.3g}")
        r.p("Faster than exact at every look-back from: " + "; ".join(
            f"{n}: training {c['train'] or 'never'}, forecast {c['infer'] or 'never'}" for n, c in cross.items()))
        for p in speed_plots(speed, ctx.out, plan):
            r.image(p, p.stem)
        summary["speed"] = {"rows": speed, "faster_than_exact_from": cross}
    r.save()
    return summary


def _example(ctx, series, models, data: ForecastDataConfig, tag: str):
    """One test window forecast by each trained model (first seed), over the look-back and the truth."""
    lo, hi = series.split_range("test")
    at = max(lo, data.lookback) + (hi - max(lo, data.lookback) - data.horizon) // 2
    fcs = {name: make_forecast(m, series, at, device=ctx.device) for name, m in models.items()}
    first = next(iter(fcs.values()))
    if len(fcs) == 1:
        return forecast_png(ctx.out / f"{tag}_forecast_example.png", first)

    def draw(fig, plt):
        ax = fig.add_subplot()
        keep = min(len(first.history), 3 * data.horizon)
        ax.plot(first.history_times[-keep:], first.history[-keep:, 0], color="0.35", lw=1.2, label="history")
        ax.plot(first.times, first.truth[:, 0], color="k", lw=1.6, label="actual")
        for name, fc in fcs.items():
            ax.plot(fc.times, fc.forecast[:, 0], lw=1.0, ls="--", label=name)
        ax.axvspan(first.times[0], first.times[-1], color="tab:orange", alpha=0.1, label=f"horizon ({data.horizon})")
        ax.set_ylabel(series.columns[0])
        ax.set_title(f"{series.source}: one test window (index {at}), first seed of each model")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)

    return figure(ctx.out / f"{tag}_forecast_example.png", draw, size=(9, 4.2))
