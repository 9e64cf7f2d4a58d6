import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnlab.errors import UserError
from attnlab.models.lm import LM, LMConfig
from attnlab.training import OptimConfig, TrainConfig, train
from attnlab.training.checkpoint import list_checkpoints, load_weights, resolve_checkpoint
from attnlab.training.logging import read_jsonl
from attnlab.tasks import SyntheticConfig, SyntheticTask

TINY = dict(vocab_size=32, n_layer=1, n_head=2, d_model=32, max_seq_len=32, dropout=0.1)


def _task():
    return SyntheticTask(SyntheticConfig(kind="induction", vocab_size=32, seq_len=32, eval_batches=2), batch_size=4, seed=3)


def _cfg(**kw):
    base = dict(steps=12, batch_size=4, eval_every=4, log_every=1, seed=5, device="cpu", progress=False, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


class Crash(RuntimeError):
    pass


class CrashingTask:
    """Delegates to a real task, then dies at a given step, like a killed job."""

    def __init__(self, task, at):
        self.task, self.at = task, at

    def batch(self, step, micro, rank, device):
        if step == self.at:
            raise Crash()
        return self.task.batch(step, micro, rank, device)

    def loss(self, model, batch):
        return self.task.loss(model, batch)

    def evaluate(self, model, device):
        return self.task.evaluate(model, device)


def test_resume_continues_the_loss_curve_exactly(tmp_path):
    # Dropout is on, so the RNG state must travel through the checkpoint too.
    torch.manual_seed(0)
    full = train(LM(LMConfig(**TINY)), _task(), _cfg(), out_dir=tmp_path / "a")
    torch.manual_seed(0)
    with pytest.raises(Crash):
        train(LM(LMConfig(**TINY)), CrashingTask(_task(), at=10), _cfg(), out_dir=tmp_path / "b")
    assert [p.name for p in list_checkpoints(tmp_path / "b")][-1] == "step_000008"
    resumed = train(LM(LMConfig(**TINY)), _task(), _cfg(resume=True), out_dir=tmp_path / "b")
    a = {r["step"]: r["loss"] for r in full.history}
    b = {r["step"]: r["loss"] for r in resumed.history}
    assert sorted(b) == list(range(8, 12))
    for s in b:
        assert b[s] == a[s], s  # bit for bit: weights, optimizer and dropout RNG all came back
    assert resumed.final == full.final
    # The rows the interrupted attempt logged after its checkpoint (steps 8, 9) are gone, not duplicated.
    rows = [r for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(0, 12))


def test_checkpoints_are_complete_and_pruned(tmp_path):
    train(LM(LMConfig(**TINY)), _task(), _cfg(keep_checkpoints=2), out_dir=tmp_path)
    ck = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000008", "step_000012"]
    assert not [p for p in ck.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    latest = resolve_checkpoint(tmp_path)
    assert latest.name == "step_000012"
    assert {p.name for p in latest.iterdir()} == {"model.safetensors", "config.json", "train_state.pt"}
    cfg = json.loads((latest / "config.json").read_text())
    assert cfg["train"]["steps"] == 12


def test_mismatched_checkpoint_is_refused_with_a_message(tmp_path):
    train(LM(LMConfig(**TINY)), _task(), _cfg(steps=4), out_dir=tmp_path)
    other = LM(LMConfig(**{**TINY, "d_model": 48}))
    with pytest.raises(UserError, match="does not match the model"):
        load_weights(other, resolve_checkpoint(tmp_path))
    # Resuming names the changed setting first; forced past that, the weights still refuse to load.
    with pytest.raises(UserError, match=r"model\.d_model 32 -> 48"):
        train(other, _task(), _cfg(steps=8, resume=True), out_dir=tmp_path)
    with pytest.raises(UserError, match="does not match the model"):
        train(other, _task(), _cfg(steps=8, resume=True, resume_override=True), out_dir=tmp_path)


def test_early_stop_at_target_metric():
    res = train(LM(LMConfig(**TINY)), _task(), _cfg(steps=40, early_stop_metric="val_loss", early_stop_value=100.0,
                                                     early_stop_mode="min"))
    assert res.stopped_early and res.steps == 4


def test_unknown_early_stop_metric_is_refused():
    with pytest.raises(UserError, match="early_stop_metric"):
        train(LM(LMConfig(**TINY)), _task(), _cfg(steps=4, early_stop_metric="bleu", early_stop_value=1.0))


def test_training_with_accumulation_learns_a_text(tmp_path):
    from attnlab.data import ByteTokenizer, TextCorpus
    from attnlab.tasks import TextLMTask

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    corpus = TextCorpus(text, ByteTokenizer(), cache_dir=tmp_path / "cache")
    task = TextLMTask(corpus, seq_len=32, batch_size=4, seed=0, eval_batches=4)
    torch.manual_seed(0)
    model = LM(LMConfig(**{**TINY, "vocab_size": 256, "dropout": 0.0}))
    res = train(model, task, _cfg(steps=150, eval_every=0, grad_accum=2), OptimConfig(lr=1e-2, warmup_steps=10))
    # A repeated sentence is nearly deterministic after a few characters: the loss must fall far below ln(256).
    assert res.history[0]["loss"] > 5.0
    assert res.final["val_loss"] < 1.5
    assert all(math.isfinite(r["grad_norm"]) for r in res.history)


def test_dense_finetune_switches_kernels_for_the_last_steps(monkeypatch):
    from attnlab.attention import registry

    modes = []
    orig = registry.Kernel.forward

    def spy(self, *a, **kw):
        modes.append(self.mode)
        return orig(self, *a, **kw)

    monkeypatch.setattr(registry.Kernel, "forward", spy)
    model = LM(LMConfig(**TINY))
    train(model, _task(), _cfg(steps=4, eval_every=0, dense_finetune_steps=1))
    # 4 training forwards (1 layer), then 2 eval batches: the last training step and the final eval run dense.
    assert modes[:3] == ["auto"] * 3 and modes[3:] == ["dense"] * 3
    assert all(k.mode == "auto" for k in model.modules() if isinstance(k, registry.Kernel))


@pytest.mark.slow
def test_two_process_ddp_keeps_replicas_identical(tmp_path):
    script = Path(__file__).with_name("ddp_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "ddp.json").read_text())
    assert result["world"] == 2
    assert result["max_param_diff"] == 0.0
    assert result["last_loss"] < result["first_loss"]
    # Only rank 0 writes metrics and checkpoints, and prints.
    assert len([r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]) == 6
    assert proc.stdout.count("step 6:") == 2  # the final evaluation of each of the two runs, from rank 0 alone
    # Crashed at step 4 and resumed from step 3: each rank gets its own dropout stream back, so the curve and
    # the weights are those of the uninterrupted run.
    losses = {r["step"]: r["loss"] for r in result["history"]}
    assert [(r["step"], r["loss"]) for r in result["resumed"]] == [(s, losses[s]) for s in (3, 4, 5)]
    assert result["same_weights"]


def test_float16_trains_with_a_gradient_scaler_that_resumes(tmp_path):
    from attnlab.training.checkpoint import load_train_state

    torch.manual_seed(0)
    full = train(LM(LMConfig(**TINY)), _task(), _cfg(steps=6, eval_every=3, dtype="float16"), out_dir=tmp_path / "a")
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in full.history)
    scaler = load_train_state(resolve_checkpoint(tmp_path / "a"))["scaler"]
    assert scaler["scale"] > 1  # losses are scaled up before backward, so float16 gradients do not underflow
    torch.manual_seed(0)
    with pytest.raises(Crash):
        train(LM(LMConfig(**TINY)), CrashingTask(_task(), at=4), _cfg(steps=6, eval_every=3, dtype="float16"),
              out_dir=tmp_path / "b")
    resumed = train(LM(LMConfig(**TINY)), _task(), _cfg(steps=6, eval_every=3, dtype="float16", resume=True),
                    out_dir=tmp_path / "b")
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history[3:]]
