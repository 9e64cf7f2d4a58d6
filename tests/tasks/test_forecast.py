import csv

import numpy as np
import pandas as pd
import pytest
import torch

from attnlab.data.timeseries import load_series
from attnlab.errors import UserError
from attnlab.models.forecast import ForecastConfig, ForecastTransformer
from attnlab.tasks.forecast import (
    ForecastTask,
    evaluate_baselines,
    forecast_metrics,
    forecast_png,
    make_forecast,
    write_forecast_csv,
)
from attnlab.training.trainer import OptimConfig, TrainConfig, train

QUIET = dict(log=lambda msg: None)


def series_file(tmp_path, values, name="s.csv", start="2000-01-01", freq="h"):
    values = np.asarray(values, dtype=float)
    values = values[:, None] if values.ndim == 1 else values
    df = pd.DataFrame(values, columns=[f"c{i}" for i in range(values.shape[1])])
    df.insert(0, "time", pd.date_range(start, periods=len(df), freq=freq))
    p = tmp_path / name
    df.to_csv(p, index=False)
    return p


def noisy_sine(n=1200, period=24, noise=0.2, seed=0):
    t = np.arange(n)
    g = np.random.default_rng(seed)
    return np.stack([np.sin(2 * np.pi * t / period) + noise * g.standard_normal(n),
                     2 * np.cos(2 * np.pi * t / period) + 5 + noise * g.standard_normal(n)], axis=1)


def tiny_model(lookback=48, horizon=12, **kw):
    base = dict(lookback=lookback, horizon=horizon, patch_len=8, stride=8, n_layer=1, n_head=2, d_model=16,
                dropout=0.0)
    return ForecastTransformer(ForecastConfig(**{**base, **kw}))


@pytest.fixture
def sine_task(tmp_path):
    ts = load_series(series_file(tmp_path, noisy_sine()), time_column="time", **QUIET)
    return ForecastTask(ts, 48, 12, batch_size=8, seed=3, eval_batch_size=50)


def test_batches_are_deterministic_training_windows(sine_task):
    a = sine_task.batch(5, 1, 0, "cpu")
    b = sine_task.batch(5, 1, 0, "cpu")
    c = sine_task.batch(6, 1, 0, "cpu")
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    assert not torch.equal(a["x"], c["x"])
    assert a["x"].shape == (8, 48, 2) and a["y"].shape == (8, 12, 2)
    # The targets lie in the training split: its last window ends at train_end.
    train_end = sine_task.series.bounds[0]
    scaled = torch.from_numpy(sine_task.series.scaled).float()
    for x, y in zip(a["x"], a["y"]):
        hits = [t for t in range(48, train_end - 12 + 1) if torch.equal(scaled[t:t + 12], y)]
        assert len(hits) == 1 and torch.equal(scaled[hits[0] - 48:hits[0]], x)


def test_eval_batches_cover_every_window_in_order(sine_task):
    got = list(sine_task.eval_batches("val"))
    x = torch.cat([b["x"] for b in got])
    y = torch.cat([b["y"] for b in got])
    rx, ry = sine_task.series.windows("val", 48, 12)
    assert torch.equal(x, rx) and torch.equal(y, ry)
    assert len(got) == -(-len(rx) // 50) and len(list(sine_task.eval_batches("val", limit=1))) == 1


def test_metrics_match_a_direct_computation(sine_task):
    ts = sine_task.series
    g = np.random.default_rng(0)
    pred, truth = g.standard_normal((7, 12, 2)), g.standard_normal((7, 12, 2))
    rows = forecast_metrics(pred, truth, ts, [3, 12])
    for row in rows:
        h = row["horizon"]
        e = pred[:, :h] - truth[:, :h]
        orig = (pred[:, :h] * ts.std + ts.mean) - (truth[:, :h] * ts.std + ts.mean)
        assert row["mse"] == pytest.approx((e ** 2).mean(), rel=1e-12)
        assert row["mae"] == pytest.approx(np.abs(e).mean(), rel=1e-12)
        assert row["mse_orig"] == pytest.approx((orig ** 2).mean(), rel=1e-9)
        assert row["mae_orig"] == pytest.approx(np.abs(orig).mean(), rel=1e-9)
        assert row["windows"] == 7


def test_seasonal_naive_is_exact_on_a_periodic_series(tmp_path):
    t = np.arange(600)
    periodic = np.sin(2 * np.pi * t / 12) + 0.5 * np.cos(2 * np.pi * t / 4) + 0.3 * np.sin(2 * np.pi * t / 6 + 1)
    ts = load_series(series_file(tmp_path, periodic), **QUIET)
    rows = evaluate_baselines(ts, "test", 36, 24, horizons=[6, 24])
    sn = [r for r in rows if r["model"] == "seasonal_naive"]
    assert [r["period"] for r in sn] == [12, 12]  # estimated from the training split
    assert all(r["mse"] < 1e-20 and r["mae_orig"] < 1e-10 for r in sn)
    lv = [r for r in rows if r["model"] == "last_value"]
    assert all(r["mse"] > 0.1 for r in lv)


def test_last_value_on_a_random_walk_matches_theory(tmp_path):
    # x[t+k] - x[t] is a sum of k N(0, 1) steps: the mean over steps 1..h of E[error²] is (h + 1) / 2.
    g = np.random.default_rng(1)
    ts = load_series(series_file(tmp_path, np.cumsum(g.standard_normal(20000))), **QUIET)
    rows = evaluate_baselines(ts, "test", 16, 8, horizons=[1, 4, 8], period=1)
    for r in rows:
        assert r["mse_orig"] == pytest.approx((r["horizon"] + 1) / 2, rel=0.2)
        assert r["mae_orig"] == pytest.approx(np.mean(np.sqrt(2 * np.arange(1, r["horizon"] + 1) / np.pi)), rel=0.2)
        assert r["mse"] == pytest.approx(r["mse_orig"] / ts.std[0] ** 2, rel=1e-9)


def test_baselines_agree_with_a_hand_computation(sine_task):
    ts = sine_task.series
    rows = evaluate_baselines(ts, "val", 48, 12, period=24)
    x, y = ts.windows("val", 48, 12)
    x, y = x.double().numpy(), y.double().numpy()
    lv = np.repeat(x[:, -1:], 12, axis=1)
    sn = np.concatenate([x[:, -24:-12], x[:, -24:-12]], axis=1)[:, :12]
    by = {r["model"]: r for r in rows}
    assert by["last_value"]["mse"] == pytest.approx(((lv - y) ** 2).mean(), rel=1e-12)
    assert by["seasonal_naive"]["mae"] == pytest.approx(np.abs(sn - y).mean(), rel=1e-12)


def test_the_transformer_beats_last_value_on_a_noisy_sine(sine_task):
    torch.manual_seed(0)
    model = tiny_model()
    cfg = TrainConfig(steps=60, batch_size=8, eval_every=0, progress=False, tensorboard=False, seed=0)
    result = train(model, sine_task, cfg, OptimConfig(lr=3e-3, warmup_steps=10, weight_decay=0.0))
    assert set(result.final) == {"val_loss", "val_mae", "val_mse_orig", "val_mae_orig"}
    rows = sine_task.evaluate_split(model, "test", [1, 6, 12], name="patch")
    base = {r["horizon"]: r for r in evaluate_baselines(sine_task.series, "test", 48, 12, [1, 6, 12], period=24)
            if r["model"] == "last_value"}
    assert [r["horizon"] for r in rows] == [1, 6, 12] and rows[0]["model"] == "patch"
    assert rows[-1]["mse"] < 0.2 * base[12]["mse"], (rows[-1], base[12])
    with pytest.raises(UserError, match="1..12"):
        sine_task.evaluate_split(model, "test", [24])


def test_task_refuses_a_too_short_series(sine_task):
    with pytest.raises(UserError, match="the val split"):
        ForecastTask(sine_task.series, 48, 200)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_forecast_csv_and_png(tmp_path, sine_task):
    torch.manual_seed(0)
    model = tiny_model().eval()
    ts = sine_task.series
    at = ts.bounds[1] + 5
    fc = make_forecast(model, ts, at=at)
    with torch.no_grad():
        want = model(torch.from_numpy(ts.scaled[at - 48:at]).float()[None])[0].double().numpy()
    np.testing.assert_allclose(fc.forecast, want * ts.std + ts.mean, rtol=1e-6)
    np.testing.assert_array_equal(fc.truth, ts.values[at:at + 12])
    np.testing.assert_array_equal(fc.history, ts.values[at - 48:at])
    np.testing.assert_array_equal(fc.times, ts.times[at:at + 12])
    path = write_forecast_csv(tmp_path / "out" / "fc.csv", fc)
    rows = read_csv(path)
    assert len(rows) == 12 and list(rows[0]) == ["time", "step", "c0_forecast", "c0_truth", "c1_forecast", "c1_truth"]
    assert float(rows[3]["c1_forecast"]) == pytest.approx(fc.forecast[3, 1], rel=1e-12)
    png = forecast_png(tmp_path / "out" / "fc.png", fc, title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Past the end of the data: no truth, times continue hourly.
    future = make_forecast(model, ts)
    assert future.truth is None and future.times[0] == ts.times[-1] + np.timedelta64(1, "h")
    assert "c0_truth" not in read_csv(write_forecast_csv(tmp_path / "f.csv", future))[0]
    forecast_png(tmp_path / "f.png", future)
    with pytest.raises(UserError, match="between index 48"):
        make_forecast(model, ts, at=10)
