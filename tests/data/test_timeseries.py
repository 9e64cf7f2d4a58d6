import sys

import numpy as np
import pandas as pd
import pytest
import torch

from attnlab.data.timeseries import BUILTINS, future_times, load_series, split_bounds
from attnlab.errors import UserError

QUIET = dict(log=lambda msg: None)


def frame(n=200, seed=0):
    g = np.random.default_rng(seed)
    return pd.DataFrame({
        "date": pd.date_range("2020-01-01", periods=n, freq="D"),
        "load": np.cumsum(g.standard_normal(n)) + 50,
        "label": ["x"] * n,
        "temp": g.standard_normal(n) * 3 + 10,
    })


@pytest.fixture
def csv(tmp_path):
    df = frame()
    p = tmp_path / "s.csv"
    df.to_csv(p, index=False)
    return p, df


def test_split_scaler_and_values_match_numpy(csv):
    path, df = csv
    ts = load_series(path, time_column="date", **QUIET)
    assert ts.columns == ["load", "temp"]  # numeric columns only, time column excluded
    raw = df[["load", "temp"]].to_numpy()
    n = len(raw)
    n_train, n_test = int(n * 0.7), int(n * 0.2)
    assert ts.bounds == (n_train, n - n_test)
    assert split_bounds(n, (0.5, 0.25, 0.25)) == (100, 150)
    train = raw[:n_train]
    mean = train.sum(0) / n_train
    std = np.sqrt(((train - mean) ** 2).sum(0) / n_train)
    np.testing.assert_allclose(ts.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(ts.std, std, rtol=1e-12)
    np.testing.assert_allclose(ts.scaled, (raw - mean) / std, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ts.inverse(ts.scaled), raw, rtol=1e-12, atol=1e-12)
    # Later data never influences the scaler: change the test split, the scaler stays.
    df2 = df.copy()
    df2.loc[n - n_test:, "load"] += 1000
    df2.to_csv(path, index=False)
    ts2 = load_series(path, time_column="date", **QUIET)
    np.testing.assert_array_equal(ts2.mean, ts.mean)
    np.testing.assert_array_equal(ts2.std, ts.std)
    assert np.issubdtype(ts.times.dtype, np.datetime64) and ts.times[0] == np.datetime64("2020-01-01")


def reference_windows(scaled, bounds, split, lookback, horizon):
    """Windows the slow way: every target block of `horizon` points inside the split, its look-back before it."""
    train_end, val_end = bounds
    lo, hi = {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, len(scaled))}[split]
    xs, ys = [], []
    for t in range(hi - horizon + 1):
        if t >= lo and t - lookback >= 0 and (split != "train" or t - lookback >= lo):
            xs.append(scaled[t - lookback:t])
            ys.append(scaled[t:t + horizon])
    return np.array(xs), np.array(ys)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_windows_match_a_hand_built_reference(csv, split):
    path, _ = csv
    ts = load_series(path, columns=["temp", "load"], **QUIET)
    x, y = ts.windows(split, 24, 6)
    rx, ry = reference_windows(ts.scaled, ts.bounds, split, 24, 6)
    assert x.shape == (len(rx), 24, 2) and y.shape == (len(ry), 6, 2)
    np.testing.assert_allclose(x.numpy(), rx, rtol=1e-6)
    np.testing.assert_allclose(y.numpy(), ry, rtol=1e-6)
    xo, yo = ts.windows(split, 24, 6, scaled=False)
    np.testing.assert_allclose(yo.numpy(), ts.inverse(ry), rtol=1e-6)
    assert ts.columns == ["temp", "load"]


def test_random_windows_are_seeded_training_windows(csv):
    ts = load_series(csv[0], **QUIET)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x1, y1 = ts.random_windows("train", 16, 20, 5, g1)
    x2, y2 = ts.random_windows("train", 16, 20, 5, g2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    rx, ry = reference_windows(ts.scaled, ts.bounds, "train", 20, 5)
    full = np.concatenate([rx, ry], axis=1).astype(np.float32)
    drawn = torch.cat([x1, y1], dim=1).numpy()
    for w in drawn:  # every draw is a whole training window, targets inside the training split
        assert np.isclose(full, w, rtol=1e-6).all(axis=(1, 2)).any()


def test_missing_values_leading_dropped_and_gaps_filled_forward(tmp_path):
    df = frame(100)
    df.loc[:2, "load"] = np.nan  # three leading gaps in one column
    df.loc[0, "temp"] = np.nan
    df.loc[[10, 11, 40], "load"] = np.nan
    df.loc[60, "temp"] = np.nan
    p = tmp_path / "gaps.csv"
    df.to_csv(p, index=False)
    said = []
    ts = load_series(p, time_column="date", log=said.append)
    assert ts.n_dropped == 3 and ts.n_filled == 4 and len(ts) == 97
    assert ts.times[0] == df["date"].iloc[3].to_datetime64()
    raw = df[["load", "temp"]].to_numpy()[3:]
    assert ts.values[10 - 3, 0] == raw[9 - 3, 0] and ts.values[11 - 3, 0] == raw[9 - 3, 0]
    assert ts.values[60 - 3, 1] == raw[59 - 3, 1]
    assert not np.isnan(ts.values).any()
    assert any("dropped 3 leading" in s for s in said) and any("filled 4 missing" in s for s in said)


def test_prints_the_fill_count_by_default(tmp_path, capsys):
    df = frame(100)
    df.loc[50, "temp"] = np.nan
    df.to_csv(tmp_path / "g.csv", index=False)
    load_series(tmp_path / "g.csv")
    assert "filled 1 missing value(s) forward" in capsys.readouterr().err


def test_parquet_equals_csv(tmp_path, csv):
    path, df = csv
    df.to_parquet(tmp_path / "s.parquet")
    a = load_series(path, time_column="date", **QUIET)
    b = load_series(tmp_path / "s.parquet", time_column="date", **QUIET)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.times, b.times)


def test_parquet_without_pyarrow_is_one_line(tmp_path, csv, monkeypatch):
    csv[1].to_parquet(tmp_path / "s.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    with pytest.raises(UserError, match="reading Parquet needs pyarrow"):
        load_series(tmp_path / "s.parquet", **QUIET)


def test_unsorted_time_column_is_sorted(tmp_path):
    df = frame(60)
    df.iloc[::-1].to_csv(tmp_path / "rev.csv", index=False)
    ts = load_series(tmp_path / "rev.csv", time_column="date", **QUIET)
    np.testing.assert_allclose(ts.values[:, 0], df["load"].to_numpy())


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def bad_cases(tmp_path):
    n = 100
    ok = frame(n)
    const = ok.assign(temp=5.0)
    nan_col = ok.assign(temp=np.nan)
    mixed = ok.assign(load=ok["load"].astype(object))
    mixed.loc[7, "load"] = "oops"
    cases = {
        "missing": (tmp_path / "nope.csv", {}, "not found"),
        "empty": (write(tmp_path, "e.csv", ""), {}, "is empty"),
        "blank": (write(tmp_path, "b.csv", "\n\n"), {}, "cannot read|no data rows"),
        "header only": (write(tmp_path, "h.csv", "a,b\n"), {}, "no data rows"),
        "non-numeric": (ok, {"columns": ["label"]}, "column 'label' .* is not numeric"),
        "unknown column": (ok, {"columns": ["lod"]}, "unknown column 'lod'.*valid: date, load, label, temp"),
        "mixed named": (mixed, {"columns": ["load"]}, r"column 'load' .* is not numeric \(e.g. 'oops'\); numeric columns: temp"),
        "unknown time": (ok, {"time_column": "when"}, "time column 'when' is not in"),
        "bad time": (ok, {"time_column": "label"}, "time column 'label' .* neither numbers nor dates"),
        "constant": (const, {}, "'temp' .* constant in the training split"),
        "nan-only": (nan_col, {}, "'temp' .* hold no values"),
        "no numeric": (ok[["label"]], {}, "no numeric column"),
        "train short": (ok, {"lookback": 60, "horizon": 20}, "the train split has 70 points .* at least 80"),
        "val short": (ok, {"lookback": 5, "horizon": 15}, "the val split has 10 points .* at least 15"),
        "bad split": (ok, {"split": (0.5, 0.5, 0.5)}, "split must be three positive fractions"),
        "builtin": ("builtin:nope", {}, "unknown built-in series 'nope'; choose one of: co2"),
        "type": (write(tmp_path, "x.xlsx", "1"), {}, "unknown time-series file type"),
    }
    return cases


@pytest.mark.parametrize("case", ["missing", "empty", "blank", "header only", "non-numeric", "unknown column",
                                  "mixed named", "unknown time", "bad time", "constant", "nan-only", "no numeric", "train short", "val short",
                                  "bad split", "builtin", "type"])
def test_bad_input_is_one_line_user_error(tmp_path, case):
    src, kw, match = bad_cases(tmp_path)[case]
    if isinstance(src, pd.DataFrame):
        path = tmp_path / "data.csv"
        src.to_csv(path, index=False)
        src = path
    with pytest.raises(UserError, match=match) as e:
        load_series(src, **kw, **QUIET)
    assert "\n" not in str(e.value)


def test_test_split_too_short_is_named(tmp_path):
    frame(100).to_csv(tmp_path / "d.csv", index=False)
    ts = load_series(tmp_path / "d.csv", split=(0.8, 0.15, 0.05), **QUIET)
    with pytest.raises(UserError, match="the test split has 5 points .* at least 8"):
        ts.check_lengths(10, 8)


def test_builtins_load_offline():
    from statsmodels.datasets import co2

    raw = co2.load_pandas().data["co2"].to_numpy()
    first = int(np.argmax(~np.isnan(raw)))
    ts = load_series("builtin:co2", **QUIET)
    assert len(ts) == len(raw) - first and ts.period == 52
    assert ts.n_filled == int(np.isnan(raw[first:]).sum()) > 0
    np.testing.assert_array_equal(ts.values[~np.isnan(raw[first:]), 0], raw[first:][~np.isnan(raw[first:])])
    for name in BUILTINS:
        s = load_series(f"builtin:{name}", **QUIET)
        assert s.values.ndim == 2 and len(s) >= 100 and np.isfinite(s.scaled).all()
    elnino = load_series("builtin:elnino", **QUIET)
    assert len(elnino) == 12 * 61 and str(elnino.times[13])[:7] == "1951-02"


def test_future_times_continue_the_spacing():
    weekly = pd.date_range("2001-01-06", periods=10, freq="W-SAT").to_numpy()
    got = future_times(weekly, 8, 5)
    want = pd.date_range("2001-01-06", periods=13, freq="W-SAT").to_numpy()[8:13]
    np.testing.assert_array_equal(got, want)
    years = np.arange(1900, 1950)
    np.testing.assert_array_equal(future_times(years, 50, 3), [1950, 1951, 1952])
    np.testing.assert_array_equal(future_times(None, 7, 2), [7, 8])


def test_series_config_from_yaml_like_dict(csv):
    from attnlab.config import from_dict
    from attnlab.data.timeseries import SeriesConfig

    cfg = from_dict(SeriesConfig, {"source": str(csv[0]), "time_column": "date", "columns": ["temp"],
                                   "split": [0.6, 0.2, 0.2]})
    ts = cfg.load(lookback=10, horizon=5, **QUIET)
    assert ts.columns == ["temp"] and ts.bounds == (120, 160)
    with pytest.raises(UserError, match="unknown key"):
        from_dict(SeriesConfig, {"path": "x.csv"})
