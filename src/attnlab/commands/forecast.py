"""`attnlab forecast`: the next `horizon` points of a series from a trained forecaster, as a CSV table and a
plot of the look-back, the forecast and (inside the series) what actually happened."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass
class Config:
    ckpt: str = ""
    """a forecasting run folder (its latest checkpoint) or one checkpoint folder (required)"""
    data: str = ""
    """a .csv/.parquet file or builtin:NAME holding the run's columns; default: the series the run trained on"""
    at: int | None = None
    """index of the first forecast point (the look-back ends just before it); default: just past the series'
    end, a forecast of the unknown future"""
    out: str = ""
    """output folder for forecast.csv and forecast.png (required)"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N"""
    title: str = ""
    """plot title; default: source, look-back and horizon"""


def main(cfg: Config) -> dict:
    from ..run.forecast import series_for
    from ..run.load import load_run
    from ..tasks.forecast import forecast_png, make_forecast, write_forecast_csv
    from ..training.device import resolve_device

    if not cfg.ckpt:
        raise UserError("--ckpt is required")
    if not cfg.out:
        raise UserError("--out is required (a folder for forecast.csv and forecast.png)")
    run = load_run(cfg.ckpt)
    if run.kind != "forecast":
        raise UserError(f"{run.ckpt} is a {run.kind} run, not a forecaster (train one with --task forecast)")
    # A series to forecast needs one look-back, not room for training windows.
    series = series_for(run, cfg.data, check=False)
    lookback, horizon = run.data.lookback, run.data.horizon
    if len(series) < lookback:
        raise UserError(f"{series.source} has {len(series)} usable points, fewer than the model's look-back of {lookback}")
    device, _ = resolve_device(cfg.device, "float32")
    run.model.to(device)
    fc = make_forecast(run.model, series, cfg.at, device=device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_forecast_csv(out / "forecast.csv", fc)
    at = len(series) if cfg.at is None else cfg.at
    title = cfg.title or f"{series.source}: {lookback}-step look-back, {horizon}-step forecast from index {at}"
    png_path = forecast_png(out / "forecast.png", fc, title=title)
    result = {"ckpt": str(run.ckpt), "source": series.source, "at": at, "lookback": lookback, "horizon": horizon,
              "columns": series.columns, "csv": str(csv_path), "png": str(png_path)}
    if fc.truth is not None:
        import numpy as np

        known = ~np.isnan(fc.truth)
        err = fc.forecast[known] - fc.truth[known]
        result.update(known_steps=int(known.any(axis=1).sum()), mse_orig=float(np.mean(err ** 2)),
                      mae_orig=float(np.mean(np.abs(err))))
    print(json.dumps(result, indent=2))
    return result
