"""The forecasting kind: a forecaster (the patch Transformer with any registry attention, DLinear or an LSTM)
trained on windows of a time series (a CSV/Parquet file or a built-in series).

    attnlab train --task forecast --data.source builtin:co2 --data.lookback 336 --data.horizon 96
    attnlab eval --ckpt RUN          # per-horizon MSE/MAE on the test split, next to last value and seasonal naive
    attnlab forecast --ckpt RUN --out DIR

Look-back and horizon belong to the data (they fix the windows); the model section says which forecaster
learns from them (`model.kind`), with the options of each kind side by side.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from ..attention import AttentionSpec
from ..config import from_dict
from ..data.timeseries import DEFAULT_SOURCE, SeriesConfig, TimeSeries
from ..errors import UserError
from ..models.forecast import build_forecast_model
from ..report import markdown_table, write_csv
from ..tasks.forecast import ForecastTask, evaluate_baselines
from ..training import OptimConfig, TrainConfig
from ..training.checkpoint import load_weights
from .build import Built
from .kinds import Kind, register
from .load import LoadedRun


@dataclass
class ForecastDataConfig:
    """The series and the windows cut from it."""

    source: str = DEFAULT_SOURCE
    """a .csv/.tsv/.parquet file, or builtin:NAME (co2, elnino, sunspots, macrodata, nile)"""
    columns: list[str] = field(default_factory=list)
    """target columns, forecast together (empty: every numeric column but the time column)"""
    time_column: str | None = None
    """the time column, for dates on plots and forecasts (a built-in series names its own)"""
    split: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])
    """train/val/test fractions, in time order; the scaler is fitted on the training part"""
    lookback: int = 336
    """input points per window"""
    horizon: int = 96
    """points predicted at once (the longest horizon evaluated)"""
    horizons: list[int] = field(default_factory=list)
    """horizons `attnlab eval` reports, each over the first h steps of the same windows; empty: the horizon"""
    period: int = 0
    """seasonal period of the seasonal-naive baseline; 0: a built-in series' own, else estimated from the
    training split"""
    eval_batch_size: int = 256
    """windows per evaluation batch"""

    def __post_init__(self):
        if self.lookback < 1 or self.horizon < 1 or self.eval_batch_size < 1:
            raise UserError("data.lookback, data.horizon and data.eval_batch_size must be at least 1")
        bad = [h for h in self.horizons if not 1 <= int(h) <= self.horizon]
        if bad:
            raise UserError(f"data.horizons {bad} must lie in 1..data.horizon={self.horizon}")
        if self.period < 0:
            raise UserError(f"data.period must be 0 (estimate) or a positive period, got {self.period}")

    def eval_horizons(self) -> list[int]:
        return sorted({int(h) for h in self.horizons}) or [self.horizon]

    def load(self, *, check: bool = True, log=None) -> TimeSeries:
        """The series, split and scaled; `check`: refuse it unless every split holds a window."""
        series = SeriesConfig(self.source, self.time_column, list(self.columns), list(self.split))
        return series.load(self.lookback if check else None, self.horizon if check else None, log=log)

    def seasonal_period(self, series: TimeSeries) -> int | None:
        """The period for seasonal naive: the configured one, a built-in's own, or None (estimate)."""
        return self.period or series.period or None


@dataclass
class ForecastModelConfig:
    """Which forecaster, and its options. Transformer options are PatchTST's (`models.forecast.ForecastConfig`);
    look-back, horizon and channels come from the data."""

    kind: Literal["transformer", "dlinear", "lstm"] = "transformer"
    """transformer: patch Transformer with registry attention; dlinear: trend + seasonal linear maps; lstm"""
    patch_len: int = 16
    """transformer: points per patch (token)"""
    stride: int = 8
    """transformer: points between the starts of neighbouring patches"""
    pad_end: bool = True
    """transformer: one more patch that ends on the newest point"""
    n_layer: int = 3
    """transformer: encoder blocks"""
    n_head: int = 4
    """transformer: attention heads"""
    n_kv_head: int | None = None
    """transformer: key/value heads (grouped-query attention); null: n_head"""
    d_model: int = 128
    """transformer: width"""
    d_ff: int | None = None
    """transformer: MLP width; null: 2·d_model"""
    dropout: float = 0.1
    """transformer and lstm: dropout"""
    head_dropout: float = 0.0
    """transformer: dropout before the linear head"""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """transformer: normalisation layer"""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """transformer: MLP type"""
    pos: Literal["learned", "sinusoidal", "rope", "none"] = "learned"
    """transformer: patch positions"""
    rope_base: float = 10000.0
    """transformer: rotary base (pos rope)"""
    bias: bool = True
    """transformer: biases in linear layers and norms"""
    revin: bool = True
    """transformer and lstm: instance normalisation of each window, restored at the output"""
    revin_affine: bool = False
    """transformer: a learnt per-channel scale and shift inside RevIN"""
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    """transformer: the attention mechanism (name, options, layers, transform, transform_options)"""
    kernel_size: int = 25
    """dlinear: moving-average window of the trend (odd)"""
    individual: bool = False
    """dlinear: one pair of linear maps per channel instead of shared"""
    hidden: int = 128
    """lstm: hidden size"""
    lstm_layers: int = 2
    """lstm: stacked layers"""

    def __post_init__(self):
        if isinstance(self.attention, dict):
            self.attention = from_dict(AttentionSpec, self.attention, "model.attention")

    def options(self, lookback: int, horizon: int, n_channels: int) -> dict:
        """The keyword options of this kind's model config (`build_forecast_model`)."""
        shape = {"lookback": lookback, "horizon": horizon}
        if self.kind == "dlinear":
            return {**shape, "kernel_size": self.kernel_size, "individual": self.individual, "n_channels": n_channels}
        if self.kind == "lstm":
            return {**shape, "hidden": self.hidden, "n_layer": self.lstm_layers, "dropout": self.dropout,
                    "revin": self.revin}
        own = {k: v for k, v in asdict(self).items() if k not in NOT_TRANSFORMER}
        return {**own, **shape, "n_channels": n_channels}

    def build(self, lookback: int, horizon: int, n_channels: int, seed: int | None = None) -> torch.nn.Module:
        """The forecaster, its initial weights drawn from `seed` (None: the global generator as it stands)."""
        if seed is not None:
            torch.manual_seed(seed)
        return build_forecast_model(self.kind, self.options(lookback, horizon, n_channels))


NOT_TRANSFORMER = ("kind", "kernel_size", "individual", "hidden", "lstm_layers")


@dataclass
class ForecastRunConfig:
    """A forecaster trained on windows of a time series."""

    out: str = "runs/forecast"
    """the run folder: checkpoints, metrics.jsonl, TensorBoard events"""
    task: Literal["forecast"] = "forecast"
    """forecast: a forecaster on a time series (other tasks take other options)"""
    model: ForecastModelConfig = field(default_factory=ForecastModelConfig)
    """the forecaster (model.kind) and its options"""
    data: ForecastDataConfig = field(default_factory=ForecastDataConfig)
    """the series, its split and the window lengths"""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1000, batch_size=32, eval_every=100))
    """steps, batch size, evaluation and checkpoint cadence, seed, device"""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=50,
                                                                    weight_decay=0.01))
    """AdamW and its learning-rate schedule"""


def build(cfg: ForecastRunConfig, run_dir: Path | None = None, *, fresh: bool = True, series: TimeSeries | None = None,
          log=None) -> Built:
    """The series (checked: every split holds a window), the model from `train.seed`, then the task. The
    returned config names the resolved target columns, so a checkpoint knows its channels."""
    series = series if series is not None else cfg.data.load(log=log)
    cfg = replace(cfg, data=replace(cfg.data, columns=list(series.columns)))
    model = cfg.model.build(cfg.data.lookback, cfg.data.horizon, series.n_channels, seed=cfg.train.seed)
    task = ForecastTask(series, cfg.data.lookback, cfg.data.horizon, batch_size=cfg.train.batch_size,
                        seed=cfg.train.seed, eval_batch_size=cfg.data.eval_batch_size)
    return Built(model, None, task, cfg)


def load(record: dict, ckpt, run_dir) -> LoadedRun:
    run = record.get("run", {})
    mcfg = from_dict(ForecastModelConfig, run.get("model"), "checkpoint model config")
    data = from_dict(ForecastDataConfig, run.get("data"), "checkpoint data config")
    if not data.columns:
        raise UserError(f"{ckpt}: the checkpoint does not name its series' columns")
    model = mcfg.build(data.lookback, data.horizon, len(data.columns))
    load_weights(model, ckpt)
    return LoadedRun(model, None, data, record, ckpt, run_dir, "forecast")


def series_for(run: LoadedRun, source: str = "", *, check: bool = True) -> TimeSeries:
    """The run's series, or `source` read with the run's columns, time column and split."""
    data = replace(run.data, source=source) if source else run.data
    return data.load(check=check)


def evaluate_table(model, series: TimeSeries, data: ForecastDataConfig, split: str = "test", *, device=None,
                   name: str | None = None) -> list[dict]:
    """Per-horizon rows for `model` and the training-free baselines on the same windows of `split`."""
    task = ForecastTask(series, data.lookback, data.horizon, eval_batch_size=data.eval_batch_size)
    hs = data.eval_horizons()
    rows = task.evaluate_split(model, split, hs, device=device, name=name or model_name(model))
    return rows + evaluate_baselines(series, split, data.lookback, data.horizon, hs, period=data.seasonal_period(series))


def model_name(model) -> str:
    cfg = model.cfg
    spec = getattr(cfg, "attention", None)
    if spec is None:
        return type(model).__name__.replace("Forecaster", "").lower()
    label = spec.name if spec.layers == "all" else f"{spec.name}@{spec.layers}"
    return f"transformer/{label}" + (f"+{spec.transform}" if spec.transform not in ("", "none", None) else "")


COLUMNS = ["model", "horizon", "mse", "mae", "mse_orig", "mae_orig", "windows"]


def evaluate_run(run: LoadedRun, cfg, device, amp) -> dict:
    from ..inference.ensemble import attention_mode

    if cfg.ensemble > 1:
        raise UserError("--ensemble applies to language models; a forecast run is scored with one pass")
    if cfg.tta != "none":
        raise UserError("--tta applies to image runs")
    split = "test" if cfg.split == "auto" else cfg.split
    series = series_for(run, cfg.data)
    with attention_mode(run.model, None if cfg.mode == "auto" else cfg.mode):
        rows = evaluate_table(run.model, series, run.data, split, device=device)
    out = Path(cfg.out) if cfg.out else run.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "metrics.csv", rows)
    table = markdown_table(rows, [c for c in COLUMNS if c != "windows"])
    (out / "metrics.md").write_text(f"{series.source}, {split} split, look-back {run.data.lookback}:\n\n{table}\n")
    print(table, file=sys.stderr)
    return {"source": series.source, "split": split, "lookback": run.data.lookback, "horizon": run.data.horizon,
            "windows": rows[0]["windows"], "rows": rows, "table": str(out / "metrics.md")}


register(Kind("forecast", ForecastRunConfig, build, load, evaluate_run,
              "a forecaster (patch Transformer with any attention, DLinear, LSTM) on a time series"))
