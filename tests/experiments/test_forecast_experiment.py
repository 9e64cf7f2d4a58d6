"""`attnlab run forecast --quick`: every model on the built-in series and on a file, baselines on the same
windows, the speed sweep, and the claims' bookkeeping."""

import csv
import json

import numpy as np
import pandas as pd
import pytest

from attnlab.cli import main
from attnlab.data.timeseries import load_series
from attnlab.experiments.forecast import MODELS, tables
from attnlab.tasks.forecast import evaluate_baselines


def test_quick_run_on_the_builtin_series(tmp_path, capsys):
    out = tmp_path / "fc"
    assert main(["run", "forecast", "--out", str(out), "--quick"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    tabs = summary["sources"]["builtin:co2"]["tables"]
    assert sorted(tabs, key=int) == ["8", "16"]
    for rows in tabs.values():
        assert [r["model"] for r in rows] == [*MODELS, "last_value", "seasonal_naive"]
    with open(out / "accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    # The naive rows are those of the windows a direct evaluation cuts (look-back 64, horizon 16, test split).
    series = load_series("builtin:co2", log=lambda m: None)
    direct = {(r["model"], r["horizon"]): r for r in evaluate_baselines(series, "test", 64, 16, [8, 16], period=52)}
    for r in rows:
        if r["model"] in ("last_value", "seasonal_naive"):
            ref = direct[(r["model"], int(r["horizon"]))]
            assert float(r["mse"]) == pytest.approx(ref["mse"], rel=1e-6) and int(r["windows"]) == ref["windows"]
    assert {int(r["windows"]) for r in rows} == {direct[("last_value", 8)]["windows"]}
    search = summary["sources"]["builtin:co2"]["lr_search"]
    assert {(r["family"], r["lr"]) for r in search} == {(f, lr) for f in ("transformer", "dlinear", "lstm")
                                                         for lr in (1e-3, 3e-3)}
    for fam, lr in summary["sources"]["builtin:co2"]["lr"].items():  # the lowest validation MSE wins
        assert lr == min((r for r in search if r["family"] == fam), key=lambda r: r["val_mse"])["lr"]
    speed = summary["speed"]["rows"]
    assert [(r["lookback"], r["mechanism"]) for r in speed] == [(L, m) for L in (64, 128) for m in ("exact", "hyper", "ssa")]
    assert all(r["train_s"] > 0 and r["infer_s"] > 0 and r["tokens"] == r["lookback"] // 8 + 1 for r in speed)
    for name in ("co2_mse_by_horizon", "co2_forecast_example", "speed_train", "speed_forecast", "speed_memory"):
        assert (out / f"{name}.png").stat().st_size > 5_000
    # Every trained run is an ordinary forecasting run.
    capsys.readouterr()
    (kv,) = (out / "runs" / "co2").glob("kv_shift-seed0-lr*")
    assert main(["eval", "--ckpt", str(kv)]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["model"] == "transformer/exact+kv_shift"


def test_quick_run_on_a_file(tmp_path):
    t = np.arange(600)
    df = pd.DataFrame({"when": pd.date_range("2001-01-01", periods=600, freq="D"), "label": ["x"] * 600,
                       "load": 10 + np.sin(2 * np.pi * t / 7) + 0.01 * t})
    df.to_csv(tmp_path / "s.csv", index=False)
    out = tmp_path / "fc"
    assert main(["run", "forecast", "--out", str(out), "--quick", "--builtins", "[]", "--data", str(tmp_path / "s.csv"),
                 "--time_column", "when", "--models", '["exact", "dlinear"]', "--speed_lookbacks", "[]"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["sources"]) == [str(tmp_path / "s.csv")] and "speed" not in summary
    assert (out / "data_forecast_example.png").is_file()


def _rows(model, mses, h=24):
    return [{"model": model, "horizon": h, "seed": i if model not in ("last_value", "seasonal_naive") else None,
             "mse": m, "mae": m, "mse_orig": m, "mae_orig": m} for i, m in enumerate(mses)]


def test_claims_bookkeeping():
    rows = (_rows("exact", [1.0, 1.1, 0.9]) + _rows("hyper", [1.0, 2.5, 1.0]) + _rows("dlinear", [1.5, 1.6, 1.4])
            + _rows("ssa", [1.3, 1.5, 1.7]) + _rows("last_value", [2.0]) + _rows("seasonal_naive", [3.0]))
    per_h, claims = tables(rows, ["exact", "hyper", "ssa", "dlinear"], [24])
    assert claims["beats_naive_every_horizon"] == {"exact": True, "hyper": False, "ssa": True, "dlinear": True}
    verdicts = {m: v[24]["verdict"] for m, v in claims["vs_dlinear"].items()}
    assert verdicts == {"exact": "better", "hyper": "within noise", "ssa": "within noise"}
    exact = next(r for r in per_h[24] if r["model"] == "exact")
    assert exact["/ last_value"] == pytest.approx(0.5) and exact["mse_std"] == pytest.approx(np.std([1.0, 1.1, 0.9], ddof=1))


def test_crossover_needs_a_margin_at_every_longer_lookback():
    from attnlab.experiments.forecast_speed import crossovers

    ratios = {"hyper": [1.3, 0.95, 0.8, 0.6], "ssa": [1.0, 0.85, 1.02, 0.7], "same": [1.0, 0.97, 0.95, 0.93]}
    rows = [{"lookback": L, "mechanism": m, "train_vs_exact": r, "infer_vs_exact": r}
            for m, rs in ratios.items() for L, r in zip((512, 1024, 2048, 4096), rs)]
    got = crossovers(rows)
    assert {m: c["train"] for m, c in got.items()} == {"hyper": 2048, "ssa": 4096, "same": None}
