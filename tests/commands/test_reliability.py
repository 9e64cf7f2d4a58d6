"""The reliability cases of the command layer, each once broken: seeds govern `attnlab train`, bad values
fail before any work with one line, a run folder has one owner, experiments never mix their outputs."""

from __future__ import annotations

import json

import pytest

from attnlab.cli import main

TINY = ["--model.n_layer", "1", "--model.n_head", "2", "--model.d_model", "16", "--model.max_seq_len", "16",
        "--train.batch_size", "2", "--train.progress", "false", "--train.tensorboard", "false",
        "--data.eval_batches", "1", "--train.eval_every", "2"]


@pytest.fixture
def text(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "text.txt"
    p.write_text("It is a truth universally acknowledged, that a single man in possession. " * 40)
    return p


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnlab: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def _rows(path):
    # tokens_per_s and time are wall-clock readings; everything else in a row is a function of config and seed.
    return [{k: v for k, v in json.loads(line).items() if "tokens_per_s" not in k and k != "time"}
            for line in path.read_text().splitlines()]


def test_same_seed_gives_identical_metrics_even_in_one_process(tmp_path, text, capsys):
    import torch

    runs = []
    for i in range(2):
        torch.manual_seed(1000 + i)  # whatever the global generator holds, the run's seed decides
        out = tmp_path / f"r{i}"
        assert main(["train", "--out", str(out), "--data.path", str(text), "--train.steps", "4",
                     "--train.seed", "5", *TINY]) == 0
        runs.append(_rows(out / "metrics.jsonl"))
    assert runs[0] == runs[1] and len(runs[0]) >= 3
    out = tmp_path / "other"
    assert main(["train", "--out", str(out), "--data.path", str(text), "--train.steps", "4", "--train.seed", "6",
                 *TINY]) == 0
    assert _rows(out / "metrics.jsonl")[0]["train/loss"] != runs[0][0]["train/loss"]


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--ckpt", "RUN", "--ensemble", "0"], "ensemble must be at least 1"),
    (["eval", "--ckpt", "RUN", "--batches", "0"], "batches must be at least 1"),
    (["generate", "--ckpt", "RUN", "--max_new_tokens", "-3"], "max_new_tokens must be at least 1"),
    (["generate", "--ckpt", "RUN", "--top_p", "1.5"], "top_p"),
    (["eval", "--ckpt", "RUN", "--device", "tpu"], "unknown device"),
])
def test_bad_eval_and_generate_values_fail_with_one_line(tmp_path, text, capsys, argv, needle):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--data.path", str(text), "--train.steps", "2", *TINY]) == 0
    capsys.readouterr()
    assert main([str(run) if a == "RUN" else a for a in argv]) == 2
    assert needle in _one_line(capsys)


def test_unknown_early_stop_metric_fails_before_any_work(tmp_path, text, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data.path", str(text), "--train.steps", "2",
                 "--train.early_stop_metric", "accuracy", "--train.early_stop_value", "0.9", *TINY]) == 2
    assert "not a metric of this task" in _one_line(capsys)
    assert not out.exists()  # nothing written: a failed new run leaves no folder behind


def test_a_failed_new_run_leaves_nothing_and_an_owned_folder_is_refused(tmp_path, text, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data.path", str(text), "--data.tokenizer", "char",
                 "--model.max_seq_len", "4000", "--train.steps", "2", *TINY[:6], *TINY[8:]]) == 2
    _one_line(capsys)
    assert not out.exists()  # no tokenizer/ or empty metrics.jsonl left to mix with the next run
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", "--out", str(out), "--data.path", str(text), "--train.steps", "2", *TINY]) == 2
    assert "not empty" in _one_line(capsys)
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_an_experiment_refuses_a_used_out(tmp_path, capsys):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "report.md").write_text("an earlier report")
    assert main(["run", "compare", "--out", str(out), "--quick", "--mechanisms", "[exact]",
                 "--transforms", "false"]) == 2
    assert "not empty" in _one_line(capsys)
    assert (out / "report.md").read_text() == "an earlier report"


def test_only_the_main_process_writes_the_summary(tmp_path, text, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr("attnlab.training.is_main", lambda: False)
    monkeypatch.setattr("attnlab.training.distributed.is_main", lambda: False)
    assert main(["train", "--out", str(out), "--data.path", str(text), "--train.steps", "2", *TINY]) == 0
    assert not (out / "train_summary.json").exists()
    assert "{" not in capsys.readouterr().out
