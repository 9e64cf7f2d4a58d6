"""The command line as a user meets it: typed configs, YAML round trips, one-line errors, nothing overwritten."""

import json
import subprocess
import sys

import pytest

from attnlab.cli import main

TINY = ["--model.n_layer", "1", "--model.n_head", "2", "--model.d_model", "32", "--model.max_seq_len", "32",
        "--train.batch_size", "4", "--train.eval_every", "0", "--train.progress", "false", "--data.eval_batches", "2"]


@pytest.fixture
def text(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "text.txt"
    p.write_text("To be, or not to be, that is the question. " * 80)
    return p


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnlab: error:") and "\n" not in err, err
    assert "Traceback" not in err
    return err


def test_train_eval_generate_round_trip(tmp_path, text, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data.path", str(text), "--data.tokenizer", "char",
                 "--train.steps", "6", *TINY]) == 0
    assert (out / "checkpoints" / "latest").is_file() and (out / "tokenizer").is_dir()
    assert (out / "metrics.jsonl").is_file() and any((out / "tb").iterdir())
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out), "--batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ppl"] > 1 and result["tokens"] > 0
    assert main(["generate", "--ckpt", str(out), "--prompt", "To be", "--max_new_tokens", "10", "--seed", "1"]) == 0
    sample = capsys.readouterr().out.splitlines()[0]
    assert sample.startswith("To be") and len(sample) == 15


def test_yaml_config_prints_and_reloads(tmp_path, text, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model.n_layer", "3", "--print_config"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "n_layer: 3" in printed
    cfg = tmp_path / "c.yaml"
    cfg.write_text(printed)
    out = tmp_path / "r"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--data.path", str(text), "--train.steps", "2",
                 *TINY[2:]]) == 0
    saved = json.loads((out / "checkpoints" / "step_000002" / "config.json").read_text())
    assert saved["run"]["model"]["d_model"] == 32 and saved["run"]["model"]["n_layer"] == 3  # from the file; d_model from the command line


@pytest.mark.parametrize("argv, needle", [
    (["train", "--model.n_layerz", "2"], "unrecognized arguments"),
    (["train", "--model.n_layer", "two"], "model.n_layer"),
    (["train", "--model.attention.name", "nope", "--data.source", "induction", "--train.steps", "1"], "unknown attention mechanism"),
    (["train", "--data.path", "/no/such/file.txt"], "not found"),
    (["eval", "--ckpt", "/no/such/run"], "not found"),
    (["run", "compare", "--out", "x", "--quick", "--n_layer", "x"], "n_layer"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in _err(capsys)


def test_unknown_key_in_yaml_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  n_layers: 4\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "n_layers" in _err(capsys)


def test_empty_corpus_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train", "--out", str(tmp_path / "o"), "--data.path", str(empty)]) == 2
    assert "empty" in _err(capsys)


def test_over_long_context_is_refused(tmp_path, text, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data.path", str(text), "--train.steps", "1", *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out), "--context", "64"]) == 2
    assert "max_seq_len" in _err(capsys)
    assert main(["generate", "--ckpt", str(out), "--prompt", "To be", "--max_new_tokens", "100", "--sliding_window", "false"]) == 2
    assert "max_seq_len" in _err(capsys)


def test_existing_run_is_not_overwritten_and_mismatched_resume_is_refused(tmp_path, text, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data.path", str(text), "--train.steps", "2", *TINY]) == 0
    weights = (out / "checkpoints" / "step_000002" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--data.path", str(text), "--train.steps", "2", *TINY]) == 2
    assert "already holds a run" in _err(capsys)
    wider = [a if a != "32" or TINY[i - 1] != "--model.d_model" else "64" for i, a in enumerate(TINY)]
    assert main(["train", "--out", str(out), "--data.path", str(text), "--train.steps", "4", "--train.resume", "true",
                 *wider]) == 2
    assert "model.d_model 32 -> 64" in _err(capsys)  # the changed setting is named before any weight loads
    assert (out / "checkpoints" / "step_000002" / "model.safetensors").read_bytes() == weights


def test_console_script_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "attnlab.cli", "train", "--data.path", str(tmp_path / "missing.txt")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr


def test_list_names_every_mechanism_and_experiment(capsys):
    from attnlab.attention import kernels
    from attnlab.run.experiment import entries

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in [*kernels(), *entries()]:
        assert name in out


def _undocumented(parser, path=()):
    """Options of `parser` and its sub-commands whose help says nothing beyond type and default."""
    import argparse

    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _undocumented(sub, (*path, name))
            continue
        if not action.option_strings or action.dest in ("help", "config", "print_config"):
            continue
        if type(action).__name__ == "_ActionConfigLoad":  # the --model CONFIG loader of a nested section
            continue
        text = (action.help or "").strip()
        if not text or text.startswith("(type"):
            missing.append(" ".join((*path, action.option_strings[0])))
    return missing


def test_every_option_of_every_command_is_documented():
    from attnlab.cli import build_parser
    from attnlab.run.kinds import kinds

    assert _undocumented(build_parser([])) == []
    for task in kinds():
        assert _undocumented(build_parser(["train", "--task", task])) == [], task
