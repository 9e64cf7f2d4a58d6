"""The forecasting kind end to end through the command line: train, eval, forecast, and bad input."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from attnlab.cli import main
from attnlab.models.forecast import ForecastConfig
from attnlab.run.forecast import NOT_TRANSFORMER, ForecastModelConfig
from attnlab.run.load import load_run

L, H = 32, 8
TINY = ["--task", "forecast", "--data.lookback", str(L), "--data.horizon", str(H), "--data.horizons", "[4, 8]",
        "--model.patch_len", "8", "--model.stride", "8", "--model.n_layer", "1", "--model.n_head", "2",
        "--model.d_model", "16", "--train.batch_size", "8", "--train.eval_every", "0", "--train.progress", "false",
        "--train.tensorboard", "false"]


def write_csv(path, columns: dict, n=None):
    n = n or len(next(iter(columns.values())))
    df = pd.DataFrame({"time": pd.date_range("2020-01-01", periods=n, freq="h"), **columns})
    df.to_csv(path, index=False)
    return path


@pytest.fixture
def sine_csv(tmp_path):
    t = np.arange(400)
    g = np.random.default_rng(0)
    return write_csv(tmp_path / "sine.csv", {"a": np.sin(2 * np.pi * t / 12) + 0.1 * g.standard_normal(400) + 20,
                                             "b": np.cos(2 * np.pi * t / 12) * 3 + 0.1 * g.standard_normal(400)})


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("attnlab: error:"), err
    return err


def _train(tmp_path, sine_csv, *extra, name="run"):
    out = tmp_path / name
    argv = ["train", *TINY, "--out", str(out), "--data.source", str(sine_csv), "--data.time_column", "time",
            "--train.steps", "4", *extra]
    assert main(argv) == 0
    return out


def test_transformer_options_mirror_the_model_config():
    own = {f.name: f.default for f in dataclasses.fields(ForecastModelConfig) if f.name not in NOT_TRANSFORMER}
    model = {f.name: f.default for f in dataclasses.fields(ForecastConfig)
             if f.name not in ("lookback", "horizon", "n_channels")}
    assert set(own) == set(model)
    assert {k: v for k, v in own.items() if k != "attention"} == {k: v for k, v in model.items() if k != "attention"}


def test_train_eval_forecast_round_trip(tmp_path, sine_csv, capsys):
    out = _train(tmp_path, sine_csv)
    record = json.loads(next((out / "checkpoints").glob("step_*/config.json")).read_text())
    assert record["run"]["task"] == "forecast" and record["run"]["data"]["columns"] == ["a", "b"]
    capsys.readouterr()

    assert main(["eval", "--ckpt", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["split"] == "test" and (out / "eval" / "metrics.csv").is_file()
    rows = {(r["model"], r["horizon"]): r for r in res["rows"]}
    assert set(rows) == {(m, h) for m in ("transformer/exact", "last_value", "seasonal_naive") for h in (4, 8)}
    assert len({r["windows"] for r in res["rows"]}) == 1  # every row covers the same windows

    # A slow reference: every test window cut by hand, predicted, mapped back to original units.
    run = load_run(out)
    values = pd.read_csv(sine_csv)[["a", "b"]].to_numpy(np.float64)
    n = len(values)
    train_end, val_end = int(n * 0.7), n - int(n * 0.2)
    mean, std = values[:train_end].mean(0), values[:train_end].std(0)
    starts = range(max(val_end, L), n - H + 1)
    assert rows[("last_value", 8)]["windows"] == len(starts)
    x = torch.tensor(np.stack([(values[t - L:t] - mean) / std for t in starts]), dtype=torch.float32)
    truth = np.stack([values[t:t + H] for t in starts])
    with torch.no_grad():
        pred = run.model.eval()(x).double().numpy() * std + mean
    for h in (4, 8):
        assert rows[("transformer/exact", h)]["mse_orig"] == pytest.approx(np.mean((pred[:, :h] - truth[:, :h]) ** 2), rel=1e-5)
        last = np.repeat(np.stack([values[t - 1] for t in starts])[:, None], h, axis=1)
        assert rows[("last_value", h)]["mae_orig"] == pytest.approx(np.mean(np.abs(last - truth[:, :h])), rel=1e-6)  # windows are float32
    assert rows[("seasonal_naive", 8)]["period"] == 12

    # The future past the series' end, then a forecast inside it with the truth beside it.
    assert main(["forecast", "--ckpt", str(out), "--out", str(tmp_path / "fc")]) == 0
    table = pd.read_csv(tmp_path / "fc" / "forecast.csv")
    assert len(table) == H and list(table.columns) == ["time", "step", "a_forecast", "b_forecast"]
    assert pd.to_datetime(table["time"]).iloc[0] == pd.Timestamp("2020-01-01") + pd.Timedelta(hours=n)
    x_end = torch.tensor((values[-L:] - mean) / std, dtype=torch.float32)[None]
    with torch.no_grad():
        expect = run.model(x_end)[0].double().numpy() * std + mean
    np.testing.assert_allclose(table[["a_forecast", "b_forecast"]].to_numpy(), expect, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "fc" / "forecast.png").stat().st_size > 10_000
    capsys.readouterr()
    assert main(["forecast", "--ckpt", str(out), "--out", str(tmp_path / "fc2"), "--at", "100"]) == 0
    table = pd.read_csv(tmp_path / "fc2" / "forecast.csv")
    np.testing.assert_allclose(table[["a_truth", "b_truth"]].to_numpy(), values[100:100 + H])


@pytest.mark.parametrize("kind", ["dlinear", "lstm"])
def test_baseline_kinds_train_and_reload(tmp_path, sine_csv, kind, capsys):
    out = _train(tmp_path, sine_csv, "--model.kind", kind, "--model.hidden", "8", "--model.lstm_layers", "1",
                 "--model.kernel_size", "5")
    summary = json.loads((out / "train_summary.json").read_text())
    run = load_run(out)
    assert run.model.cfg.lookback == L and type(run.model).__name__.lower().startswith(kind)
    from attnlab.run.forecast import series_for
    from attnlab.tasks.forecast import ForecastTask

    task = ForecastTask(series_for(run), L, H)
    assert task.evaluate(run.model, "cpu")["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["model"] == kind


def test_attention_and_transform_are_recorded(tmp_path, sine_csv):
    out = _train(tmp_path, sine_csv, "--model.attention.name", "ssa", "--model.attention.options", '{"factor": 2}',
                 "--model.attention.transform", "kv_shift")
    spec = load_run(out).model.cfg.attention
    assert (spec.name, spec.options, spec.transform) == ("ssa", {"factor": 2}, "kv_shift")


def _bad_series(tmp_path, kind):
    t = np.arange(300, dtype=float)
    if kind == "text":
        return write_csv(tmp_path / "t.csv", {"a": t, "name": ["x"] * 300}), ["--data.columns", '["name"]']
    if kind == "unknown":
        return write_csv(tmp_path / "u.csv", {"a": t}), ["--data.columns", '["nope"]']
    if kind == "short":
        return write_csv(tmp_path / "s.csv", {"a": np.sin(t[:40])}), []
    if kind == "constant":
        return write_csv(tmp_path / "c.csv", {"a": np.full(300, 4.0)}), []
    if kind == "nan":
        return write_csv(tmp_path / "n.csv", {"a": t, "b": np.full(300, np.nan)}), ["--data.columns", '["a", "b"]']
    return tmp_path / "missing.csv", []


@pytest.mark.parametrize("kind, needle", [
    ("missing", "not found"), ("text", "not numeric"), ("unknown", "unknown column 'nope'"),
    ("short", "the train split has 28 points but lookback=32 + horizon=8"), ("constant", "constant"),
    ("nan", "'b'"),
])
def test_bad_series_is_one_line_and_exit_2(tmp_path, capsys, kind, needle):
    path, extra = _bad_series(tmp_path, kind)
    assert main(["train", *TINY, "--out", str(tmp_path / "o"), "--data.source", str(path), *extra]) == 2
    assert needle in _err(capsys)
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_forecast_command_refuses_bad_input(tmp_path, sine_csv, capsys):
    out = _train(tmp_path, sine_csv)
    short = write_csv(tmp_path / "short.csv", {"a": np.arange(20.0), "b": np.arange(20.0) ** 2})
    cases = [
        (["--data", str(short)], "fewer than the model's look-back of 32"),
        (["--data", str(tmp_path / "nope.csv")], "not found"),
        (["--at", "5"], "between index 32"),
        (["--data", str(write_csv(tmp_path / "x.csv", {"c": np.arange(100.0)}))], "unknown column 'a'"),
    ]
    for extra, needle in cases:
        assert main(["forecast", "--ckpt", str(out), "--out", str(tmp_path / "f"), *extra]) == 2
        assert needle in _err(capsys)
    assert main(["eval", "--ckpt", str(out), "--ensemble", "2"]) == 2
    assert "ensemble" in _err(capsys)
