"""Forecasting for the trainer: random training windows, every validation/test window for evaluation.

Metrics are MSE and MAE on the standardised series (the literature's convention, comparable across datasets)
and in the series' original units (after the inverse transform), both averaged over windows, steps and
channels. Per-horizon metrics evaluate one model trained for the longest horizon H on the first h <= H steps
of the same windows, so every row of a table covers the same windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.timeseries import TimeSeries, future_times
from ..errors import UserError
from ..models.forecast_baselines import estimate_period, last_value_forecast, seasonal_naive_forecast
from ..training.trainer import batch_generator


def forecast_metrics(pred, truth, series: TimeSeries, horizons: list[int]) -> list[dict]:
    """One row per h in `horizons`: MSE/MAE over the first h steps of pred and truth ([N, H, C], scaled),
    scaled and in original units."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    p_orig, t_orig = series.inverse(p), series.inverse(t)
    rows = []
    for h in horizons:
        e, e_orig = p[:, :h] - t[:, :h], p_orig[:, :h] - t_orig[:, :h]
        rows.append({"horizon": h, "mse": float(np.mean(e ** 2)), "mae": float(np.mean(np.abs(e))),
                     "mse_orig": float(np.mean(e_orig ** 2)), "mae_orig": float(np.mean(np.abs(e_orig))),
                     "windows": int(p.shape[0])})
    return rows


def _check_horizons(horizons, horizon: int) -> list[int]:
    hs = [horizon] if not horizons else sorted({int(h) for h in horizons})
    bad = [h for h in hs if not 1 <= h <= horizon]
    if bad:
        raise UserError(f"evaluation horizon(s) {bad} must lie in 1..{horizon}, the horizon the model predicts")
    return hs


def _device_of(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class ForecastTask:
    """Windows of `lookback` inputs and `horizon` targets from a loaded, scaled TimeSeries."""

    def __init__(self, series: TimeSeries, lookback: int, horizon: int, batch_size: int = 32, seed: int = 0,
                 eval_batch_size: int = 256):
        if lookback < 1 or horizon < 1 or batch_size < 1 or eval_batch_size < 1:
            raise UserError("lookback, horizon, batch_size and eval_batch_size must be positive")
        series.check_lengths(lookback, horizon)
        self.series, self.lookback, self.horizon = series, lookback, horizon
        self.batch_size, self.seed, self.eval_batch_size = batch_size, seed, eval_batch_size

    def batch(self, step, micro, rank, device):
        g = batch_generator(self.seed, step, micro, rank)
        x, y = self.series.random_windows("train", self.batch_size, self.lookback, self.horizon, g)
        return {"x": x.to(device), "y": y.to(device)}

    @staticmethod
    def loss(model, batch):
        """(MSE over the batch's horizon values, windows in the batch)."""
        _, loss = model(batch["x"], batch["y"])
        return loss, batch["x"].shape[0]

    def n_windows(self, split: str) -> int:
        return len(self.series.target_starts(split, self.lookback, self.horizon))

    def eval_batches(self, split: str = "val", limit: int | None = None):
        """Every window of `split` in time order (target start advancing by one), `eval_batch_size` at a time."""
        n = self.n_windows(split)
        for i, lo in enumerate(range(0, n, self.eval_batch_size)):
            if limit is not None and i >= limit:
                return
            x, y = self.series.windows(split, self.lookback, self.horizon, index=slice(lo, lo + self.eval_batch_size))
            yield {"x": x, "y": y}

    @torch.no_grad()
    def predict(self, model, split: str = "val", device=None) -> tuple[np.ndarray, np.ndarray]:
        """(predictions, targets) of every window of `split`, scaled, float64 [N, horizon, C]."""
        device = device or _device_of(model)
        was = model.training
        model.eval()
        preds, truths = [], []
        try:
            for b in self.eval_batches(split):
                out = model(b["x"].to(device))
                preds.append(out.double().cpu().numpy())
                truths.append(b["y"].double().numpy())
        finally:
            model.train(was)
        c = self.series.n_channels
        empty = np.zeros((0, self.horizon, c))
        return (np.concatenate(preds) if preds else empty), (np.concatenate(truths) if truths else empty)

    def evaluate(self, model, device) -> dict[str, float]:
        """On every validation window: val_loss (scaled MSE, what training minimises), val_mae, and both in
        original units."""
        pred, truth = self.predict(model, "val", device)
        r = forecast_metrics(pred, truth, self.series, [self.horizon])[0]
        return {"val_loss": r["mse"], "val_mae": r["mae"], "val_mse_orig": r["mse_orig"], "val_mae_orig": r["mae_orig"]}

    def evaluate_split(self, model, split: str = "test", horizons: list[int] | None = None, *, device=None,
                       name: str = "model") -> list[dict]:
        """Rows {model, split, horizon, mse, mae, mse_orig, mae_orig, windows} for each h in `horizons`
        (default: the task's horizon), every h over the first h steps of the same windows."""
        hs = _check_horizons(horizons, self.horizon)
        pred, truth = self.predict(model, split, device)
        return [{"model": name, "split": split, **r} for r in forecast_metrics(pred, truth, self.series, hs)]


def evaluate_baselines(series: TimeSeries, split: str, lookback: int, horizon: int,
                       horizons: list[int] | None = None, period: int | None = None) -> list[dict]:
    """Last value and seasonal naive on the windows a ForecastTask evaluates, rows as `evaluate_split`'s.

    period: the seasonal period; None estimates it from the training split (`estimate_period`, at most
    `lookback`). The seasonal-naive rows carry the period used.
    """
    series.check_lengths(lookback, horizon)
    hs = _check_horizons(horizons, horizon)
    if period is None:
        lo, hi = series.split_range("train")
        period = estimate_period(series.scaled[lo:hi], max_period=lookback)
    x, y = series.windows(split, lookback, horizon)
    x, y = x.double(), y.double()
    rows = []
    for name, pred in (("last_value", last_value_forecast(x, horizon)),
                       ("seasonal_naive", seasonal_naive_forecast(x, horizon, period))):
        extra = {"period": period} if name == "seasonal_naive" else {}
        rows += [{"model": name, "split": split, **r, **extra}
                 for r in forecast_metrics(pred.numpy(), y.numpy(), series, hs)]
    return rows


# ----------------------------------------------------------------------------------------------------------
# One forecast, as a plot and a table.

@dataclass
class Forecast:
    """A forecast in original units: history [lookback, C] at history_times, then forecast [horizon, C] at
    times; truth [horizon, C] where the series knows it (NaN past its end), None when all lies beyond."""

    columns: list[str]
    history_times: np.ndarray
    history: np.ndarray
    times: np.ndarray
    forecast: np.ndarray
    truth: np.ndarray | None
    time_label: str = "time step"


@torch.no_grad()
def make_forecast(model, series: TimeSeries, at: int | None = None, *, device=None) -> Forecast:
    """Forecast the `horizon` points from index `at` (default: just past the series' end) from the `lookback`
    points before it; the model's cfg gives both lengths."""
    lookback, horizon = model.cfg.lookback, model.cfg.horizon
    n = len(series)
    at = n if at is None else int(at)
    if not lookback <= at <= n:
        raise UserError(f"a forecast must start between index {lookback} (one look-back in) and {n}, got {at}")
    device = device or _device_of(model)
    x = torch.from_numpy(series.scaled[at - lookback:at]).float()[None].to(device)
    was = model.training
    model.eval()
    try:
        pred = model(x)[0].double().cpu().numpy()
    finally:
        model.train(was)
    truth = None
    if at < n:
        truth = np.full((horizon, series.n_channels), np.nan)
        known = series.values[at:at + horizon]
        truth[:len(known)] = known
    label = series.time_column or "time step"
    hist_t = series.times[at - lookback:at] if series.times is not None else np.arange(at - lookback, at)
    return Forecast(series.columns, hist_t, series.values[at - lookback:at], future_times(series.times, at, horizon),
                    series.inverse(pred), truth, label)


def write_forecast_csv(path, fc: Forecast) -> Path:
    """One row per horizon step: time, step, then <column>_forecast (and <column>_truth when known)."""
    import pandas as pd

    data = {fc.time_label: fc.times, "step": np.arange(1, len(fc.times) + 1)}
    for i, c in enumerate(fc.columns):
        data[f"{c}_forecast"] = fc.forecast[:, i]
        if fc.truth is not None:
            data[f"{c}_truth"] = fc.truth[:, i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(data).to_csv(path, index=False)
    return path


def forecast_png(path, fc: Forecast, *, title: str | None = None, max_channels: int = 4) -> Path:
    """History, truth and forecast of up to `max_channels` channels, one panel each, the horizon shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(len(fc.columns), max_channels)
    fig, axes = plt.subplots(k, 1, figsize=(10, 3.2 * k), squeeze=False, sharex=True)
    for i, ax in enumerate(axes[:, 0]):
        ax.plot(fc.history_times, fc.history[:, i], color="0.35", lw=1.2, label="history (look-back)")
        if fc.truth is not None:
            # Join truth and forecast to the last observed point so the lines do not start with a gap.
            ax.plot(np.r_[fc.history_times[-1:], fc.times], np.r_[fc.history[-1:, i], fc.truth[:, i]],
                    color="tab:blue", lw=1.2, label="actual")
        ax.plot(np.r_[fc.history_times[-1:], fc.times], np.r_[fc.history[-1:, i], fc.forecast[:, i]],
                color="tab:red", lw=1.6, ls="--", label="forecast")
        ax.axvspan(fc.times[0], fc.times[-1], color="tab:orange", alpha=0.12, label=f"horizon ({len(fc.times)} steps)")
        ax.axvline(fc.times[0], color="tab:orange", lw=1.0)
        ax.set_ylabel(fc.columns[i])
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    axes[-1, 0].set_xlabel(fc.time_label)
    axes[0, 0].set_title(title or f"{len(fc.history)}-step look-back, {len(fc.times)}-step forecast")
    if np.issubdtype(np.asarray(fc.times).dtype, np.datetime64):
        fig.autofmt_xdate()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
