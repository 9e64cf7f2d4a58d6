"""Random option sets for `train`, `eval` and `generate` on tiny models: every run ends with exit 0, or with
exit 2 and exactly one line on stderr; never a traceback.

CI draws a few dozen sets per command; `ATTNLAB_FUZZ_EXAMPLES=500 pytest tests/commands/test_fuzz.py` is the
long run recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnlab.cli import main

EXAMPLES = int(os.environ.get("ATTNLAB_FUZZ_EXAMPLES", "15"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

INTS = st.sampled_from(["-5", "-1", "0", "1", "2", "3", "4", "7", "8", "16", "100000", "x", "1.5", "true", ""])
SMALL = st.sampled_from(["1", "2", "4", "0", "-1", "x"])
FLOATS = st.sampled_from(["-1", "0", "1e-3", "0.5", "0.99", "1", "2", "1e9", "nan", "inf", "x"])


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def _check(argv: list[str]) -> None:
    code, err = _run(argv)
    assert "Traceback" not in err, (argv, err)
    if code != 0:
        lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("attnlab: error:"), (argv, code, err)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("fuzz") / "text.txt"
    p.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 30)
    return p


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "run"
    code, err = _run(["train", "--out", str(out), "--data.path", str(corpus), "--data.tokenizer", "char",
                      "--model.n_layer", "1", "--model.n_head", "2", "--model.d_model", "16", "--model.max_seq_len",
                      "32", "--train.steps", "2", "--train.batch_size", "2", "--train.progress", "false",
                      "--train.tensorboard", "false", "--data.eval_batches", "1"])
    assert code == 0, err
    return out


TRAIN_OPTIONS = {
    "--model.d_model": st.sampled_from(["16", "0", "-4", "15", "32", "x"]),
    "--model.n_head": st.sampled_from(["1", "2", "0", "3", "-1"]),
    "--model.n_kv_head": st.sampled_from(["1", "2", "-1", "0", "3", "null"]),
    "--model.n_layer": SMALL,
    "--model.d_ff": st.sampled_from(["-4", "0", "8", "null"]),
    "--model.max_seq_len": st.sampled_from(["8", "16", "0", "-1", "100000"]),
    "--model.dropout": st.sampled_from(["0", "0.1", "1", "2", "-0.5"]),
    "--model.pos": st.sampled_from(["rope", "learned", "sinusoidal", "none", "alibi"]),
    "--model.mlp": st.sampled_from(["gelu", "swiglu", "relu"]),
    "--model.attention.name": st.sampled_from(["exact", "ssa", "hyper", "nope"]),
    "--model.attention.layers": st.sampled_from(["all", "last:1", "last:99", "first:0", "0", "5", "odd", "x:y"]),
    "--model.attention.transform": st.sampled_from(["none", "kv_shift", "bogus"]),
    "--model.attention.options": st.sampled_from(["{}", '{"factor": 2}', '{"sample_size": 0}', '{"nope": 1}',
                                                   '{"block_size": -1}', "[1]", "x"]),
    "--optim.lr": FLOATS,
    "--optim.min_lr": FLOATS,
    "--optim.warmup_steps": INTS,
    "--optim.weight_decay": FLOATS,
    "--optim.grad_clip": FLOATS,
    "--optim.schedule": st.sampled_from(["cosine", "constant", "inverse_sqrt", "linear"]),
    "--train.steps": st.sampled_from(["1", "2", "0", "-3", "x"]),
    "--train.batch_size": SMALL,
    "--train.grad_accum": SMALL,
    "--train.eval_every": SMALL,
    "--train.log_every": SMALL,
    "--train.save_every": SMALL,
    "--train.keep_checkpoints": SMALL,
    "--train.seed": st.sampled_from(["0", "-1", "7", "99999999999", "x"]),
    "--train.dtype": st.sampled_from(["auto", "float32", "bfloat16", "float16", "int8"]),
    "--train.device": st.sampled_from(["auto", "cpu", "cuda", "tpu", "cpu:0"]),
    "--train.early_stop_metric": st.sampled_from(["val_loss", "accuracy", "nope"]),
    "--train.early_stop_value": st.sampled_from(["0.5", "x", "null"]),
    "--data.tokenizer": st.sampled_from(["byte", "char", "bpe", "word"]),
    "--data.val_fraction": st.sampled_from(["0.1", "0.5", "0", "1", "-0.1"]),
    "--data.eval_batches": SMALL,
    "--data.source": st.sampled_from(["text", "induction", "mqar", "images"]),
    "--data.bpe_vocab_size": st.sampled_from(["300", "10", "-1"]),
}


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(TRAIN_OPTIONS)), st.none(), max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({k: TRAIN_OPTIONS[k] for k in keys})), st.booleans(), st.booleans())
def test_train_options(corpus, options, out_is_file, resume):
    tmp = Path(tempfile.mkdtemp())
    try:
        out = tmp / "run"
        if out_is_file:
            out.write_text("not a folder")
        argv = ["train", "--out", str(out), "--data.path", str(corpus), "--model.n_layer", "1", "--model.n_head",
                "2", "--model.d_model", "16", "--model.max_seq_len", "16", "--train.steps", "2",
                "--train.batch_size", "2", "--train.progress", "false", "--train.tensorboard", "false",
                "--data.eval_batches", "1", "--train.eval_every", "0"]
        if resume:
            argv += ["--train.resume", "true"]
        for k, v in options.items():
            argv += [k, v]
        _check(argv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


EVAL_OPTIONS = {
    "--batches": INTS, "--batch_size": SMALL, "--context": st.sampled_from(["0", "8", "32", "33", "-1", "x"]),
    "--split": st.sampled_from(["val", "train", "test", "dev"]), "--mode": st.sampled_from(["auto", "dense", "sample", "x"]),
    "--ensemble": SMALL, "--device": st.sampled_from(["auto", "cpu", "cuda", "gpu"]),
    "--dtype": st.sampled_from(["auto", "float32", "bfloat16", "float16", "x"]), "--seed": SMALL,
    "--data": st.sampled_from(["", "MISSING", "EMPTY"]),
}

GENERATE_OPTIONS = {
    "--max_new_tokens": INTS, "--temperature": FLOATS, "--top_k": st.sampled_from(["1", "5", "0", "-2", "null"]),
    "--top_p": st.sampled_from(["0.9", "0", "1", "1.5", "null"]), "--num_samples": SMALL,
    "--prompt": st.sampled_from(["", "It is", "§§§", "x" * 100]), "--stop": st.sampled_from(["[]", '["a"]', '["ab"]', "x"]),
    "--sliding_window": st.sampled_from(["true", "false"]), "--seed": SMALL, "--device": st.sampled_from(["cpu", "cuda"]),
}

CKPTS = st.sampled_from(["RUN", "MISSING", "FILE", "EMPTYDIR"])


def _ckpt(which: str, run_dir: Path, tmp: Path) -> str:
    if which == "RUN":
        return str(run_dir)
    if which == "FILE":
        (tmp / "f.txt").write_text("x")
        return str(tmp / "f.txt")
    if which == "EMPTYDIR":
        (tmp / "empty").mkdir()
        return str(tmp / "empty")
    return str(tmp / "missing")


def _paths(value: str, tmp: Path) -> str:
    if value == "MISSING":
        return str(tmp / "nothing.txt")
    if value == "EMPTY":
        (tmp / "empty.txt").write_text("")
        return str(tmp / "empty.txt")
    return value


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(EVAL_OPTIONS)), st.none(), max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: EVAL_OPTIONS[k] for k in keys})), CKPTS)
def test_eval_options(run_dir, options, ckpt):
    tmp = Path(tempfile.mkdtemp())
    try:
        argv = ["eval", "--ckpt", _ckpt(ckpt, run_dir, tmp), "--batches", "1"]
        for k, v in options.items():
            argv += [k, _paths(v, tmp)]
        _check(argv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(GENERATE_OPTIONS)), st.none(), max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: GENERATE_OPTIONS[k] for k in keys})), CKPTS)
def test_generate_options(run_dir, options, ckpt):
    tmp = Path(tempfile.mkdtemp())
    try:
        argv = ["generate", "--ckpt", _ckpt(ckpt, run_dir, tmp), "--max_new_tokens", "3"]
        for k, v in options.items():
            argv += [k, v]
        _check(argv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
