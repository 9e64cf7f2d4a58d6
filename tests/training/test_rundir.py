"""A run folder has one owner: new runs refuse used folders; resumes cut logs back and refuse changed settings."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnlab.errors import UserError
from attnlab.models.lm import LM, LMConfig
from attnlab.training import OptimConfig, TrainConfig, claim_run_dir, is_main, train
from attnlab.training.checkpoint import list_checkpoints
from attnlab.training.logging import read_jsonl
from attnlab.tasks import SyntheticConfig, SyntheticTask

TINY = dict(vocab_size=32, n_layer=1, n_head=2, d_model=32, max_seq_len=32, dropout=0.1)
TIMING = {"time", "train/tokens_per_s"}  # wall-clock fields; everything else must repeat exactly


def _task():
    return SyntheticTask(SyntheticConfig(kind="induction", vocab_size=32, seq_len=32, eval_batches=2), batch_size=4, seed=3)


def _cfg(**kw):
    base = dict(steps=12, batch_size=4, eval_every=4, log_every=1, seed=5, device="cpu", progress=False, tensorboard=False)
    return TrainConfig(**{**base, **kw})


def _train(out, task=None, optim=OptimConfig(), **kw):
    torch.manual_seed(0)
    return train(LM(LMConfig(**TINY)), task or _task(), _cfg(**kw), optim, out_dir=out)


class Crash(RuntimeError):
    pass


class CrashingTask:
    def __init__(self, at):
        self.task, self.at = _task(), at

    def batch(self, step, micro, rank, device):
        if step == self.at:
            raise Crash()
        return self.task.batch(step, micro, rank, device)

    def loss(self, model, batch):
        return self.task.loss(model, batch)

    def evaluate(self, model, device):
        return self.task.evaluate(model, device)


def _rows(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(Path(out) / "metrics.jsonl")]


def test_claim_accepts_a_new_or_empty_folder_and_creates_it(tmp_path):
    assert claim_run_dir(tmp_path / "a" / "b", resume=False).is_dir()
    (tmp_path / "empty").mkdir()
    claim_run_dir(tmp_path / "empty", resume=False)


def test_claim_refuses_a_folder_in_use(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer").mkdir()
    (tmp_path / "junk" / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="not empty but holds no checkpoint.*remove it or choose another --out"):
        claim_run_dir(tmp_path / "junk", resume=False)
    with pytest.raises(UserError, match="no complete checkpoint"):
        claim_run_dir(tmp_path / "junk", resume=True)
    _train(tmp_path / "run", steps=4)
    with pytest.raises(UserError, match=r"already holds a run.*--train\.resume true"):
        claim_run_dir(tmp_path / "run", resume=False)
    claim_run_dir(tmp_path / "run", resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a run folder"):
        claim_run_dir(tmp_path / "file", resume=False)


def test_claim_leaves_checks_to_rank_0(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert not is_main()
    (tmp_path / "x").write_text("rank 0 has started writing")
    claim_run_dir(tmp_path, resume=False)  # rank 0 did the check before writing
    monkeypatch.setenv("RANK", "0")
    assert is_main()


def test_new_run_into_a_used_folder_is_refused(tmp_path):
    # Previously the second run appended a second step-0 row to the first run's metrics.
    _train(tmp_path, steps=4)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        _train(tmp_path, steps=4)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_resume_cuts_logs_back_and_removes_partial_checkpoints(tmp_path):
    straight = _train(tmp_path / "a")
    with pytest.raises(Crash):
        _train(tmp_path / "b", task=CrashingTask(at=10))
    ck = tmp_path / "b" / "checkpoints"
    # What a kill during a checkpoint write or prune leaves behind.
    (ck / ".tmp_step_000012_abc").mkdir()
    (ck / ".tmp_step_000012_abc" / "model.safetensors").write_bytes(b"\0" * 1000)
    (ck / ".latest.x1y2").write_text("step_000012")
    (ck / ".del_step_000004_77").mkdir()
    resumed = _train(tmp_path / "b", resume=True)
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_000004", "step_000008", "step_000012"]
    # Row for row what the uninterrupted run logged, wall-clock fields aside: no step appears twice.
    assert _rows(tmp_path / "b") == _rows(tmp_path / "a")
    assert resumed.final == straight.final


def test_resume_refuses_changed_trajectory_settings(tmp_path):
    with pytest.raises(Crash):
        _train(tmp_path, task=CrashingTask(at=6))
    for change, needle in [(dict(optim=OptimConfig(lr=2e-3)), r"optim\.lr 0\.001 -> 0\.002"),
                           (dict(batch_size=8), "train.batch_size 4 -> 8"),
                           (dict(seed=6), "train.seed 5 -> 6"),
                           (dict(grad_accum=2), "train.grad_accum")]:
        with pytest.raises(UserError, match=needle) as e:
            _train(tmp_path, resume=True, **change)
        assert "--train.resume_override true" in str(e.value)
    # Nothing was touched by the refusals: the run still resumes, and an override is accepted.
    res = _train(tmp_path, resume=True, resume_override=True, optim=OptimConfig(lr=2e-3))
    assert res.steps == 12 and [r["lr"] for r in res.history][:1] != []


def test_resume_may_extend_the_run_and_change_bookkeeping(tmp_path):
    _train(tmp_path, steps=8)
    res = _train(tmp_path, steps=12, eval_every=2, log_every=3, keep_checkpoints=1, resume=True)
    assert res.steps == 12 and [p.name for p in list_checkpoints(tmp_path)] == ["step_000012"]


def test_resuming_a_finished_run_keeps_its_result(tmp_path):
    first = _train(tmp_path)
    rows = (tmp_path / "metrics.jsonl").read_bytes()
    again = _train(tmp_path, resume=True)
    assert again.steps == 12 and again.final == first.final and "val_loss" in again.final
    assert (tmp_path / "metrics.jsonl").read_bytes() == rows
    with pytest.raises(UserError, match="past train.steps=8"):
        _train(tmp_path, steps=8, resume=True)


def test_resuming_an_early_stopped_run_does_not_train_on(tmp_path):
    stop = dict(steps=40, early_stop_metric="val_loss", early_stop_value=100.0, early_stop_mode="min")
    first = _train(tmp_path, **stop)
    assert first.stopped_early and first.steps == 4
    again = _train(tmp_path, resume=True, **stop)
    assert again.stopped_early and again.steps == 4 and again.final == first.final and not again.history


def test_resume_needs_a_folder():
    with pytest.raises(UserError, match="needs an output folder"):
        _train(None, resume=True)


def test_last_step_is_saved_whatever_save_every(tmp_path):
    _train(tmp_path, steps=10, eval_every=0, save_every=4, keep_checkpoints=0)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004", "step_000008", "step_000010"]


def test_tensorboard_holds_each_step_once_after_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with pytest.raises(Crash):
        _train(tmp_path, task=CrashingTask(at=10), tensorboard=True)
    _train(tmp_path, resume=True, tensorboard=True)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    jsonl = read_jsonl(tmp_path / "metrics.jsonl")
    for tag in ("train/loss", "eval/val_loss"):
        events = acc.Scalars(tag)
        want = [(r["step"], r[tag]) for r in jsonl if tag in r]
        assert [(e.step, pytest.approx(e.value)) for e in events] == want, tag


_KILL_SCRIPT = """
import sys, time, torch
from attnlab.models.lm import LM, LMConfig
from attnlab.training import TrainConfig, train
from attnlab.tasks import SyntheticConfig, SyntheticTask

class Stuck(SyntheticTask):
    # Hangs at step 20, after checkpoint 18 and the rows of steps 18 and 19: the kill finds work to lose.
    def batch(self, step, micro, rank, device):
        if step == 20:
            open(sys.argv[1] + ".stuck", "w").close()
            time.sleep(600)
        return super().batch(step, micro, rank, device)

torch.set_num_threads(1)
torch.manual_seed(0)
task = Stuck(SyntheticConfig(kind="induction", vocab_size=32, seq_len=32, eval_batches=2), batch_size=4, seed=3)
cfg = TrainConfig(steps=40, batch_size=4, eval_every=0, save_every=3, log_every=1, seed=5, device="cpu",
                  progress=False, tensorboard=False)
train(LM(LMConfig(vocab_size=32, n_layer=1, n_head=2, d_model=32, max_seq_len=32, dropout=0.1)), task, cfg,
      out_dir=sys.argv[1])
"""


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess, so that both compute with the same reduction order
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_for_bit(tmp_path, one_thread):
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")])}
    victim = subprocess.Popen([sys.executable, str(script), str(tmp_path / "b")], env=env)
    cfg = dict(steps=40, eval_every=0, save_every=3)
    _train(tmp_path / "a", **cfg)  # the uninterrupted run, meanwhile
    deadline = time.monotonic() + 120
    while not (tmp_path / "b.stuck").exists() and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert list_checkpoints(tmp_path / "b")[-1].name == "step_000018"
    assert max(r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")) == 19
    _train(tmp_path / "b", resume=True, **cfg)
    assert _rows(tmp_path / "b") == _rows(tmp_path / "a")
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "checkpoints" / "step_000040" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "checkpoints" / "step_000040" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not [p for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.startswith(".")]
