"""FSDP2 under torchrun (2 CPU processes, gloo) follows the one-process loss curve, and its checkpoint loads
and resumes in one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnlab.models.lm import LM, LMConfig
from attnlab.training import OptimConfig, TrainConfig, train
from attnlab.training.checkpoint import load_weights, resolve_checkpoint
from attnlab.tasks import SyntheticConfig, SyntheticTask

MODEL = dict(vocab_size=32, n_layer=2, n_head=2, d_model=32, max_seq_len=32)  # two layers: two shards groups
TASK = dict(kind="induction", vocab_size=32, seq_len=32, eval_batches=2)
TRAIN = dict(steps=6, batch_size=2, grad_accum=2, eval_every=3, log_every=1, device="cpu", progress=False,
             tensorboard=False)
OPTIM = dict(lr=3e-3, schedule="constant", warmup_steps=1)


class AllRanks:
    """One process seeing what 2 ranks × grad_accum micro-batches see: micro i is (rank i // A, micro i % A)."""

    def __init__(self, accum):
        self.task = SyntheticTask(SyntheticConfig(**TASK), batch_size=TRAIN["batch_size"], seed=1)
        self.accum = accum

    def batch(self, step, micro, rank, device):
        return self.task.batch(step, micro % self.accum, micro // self.accum, device)

    def loss(self, model, batch):
        return self.task.loss(model, batch)

    def evaluate(self, model, device):
        return self.task.evaluate(model, device)


@pytest.mark.slow
def test_fsdp_matches_one_process_and_its_checkpoint_resumes_there(tmp_path):
    script = Path(__file__).with_name("fsdp_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # Meanwhile the reference: one process, the same global batch of 2 ranks × 2 micro-batches, 8 steps.
    accum = TRAIN["grad_accum"]
    torch.manual_seed(0)
    ref_model = LM(LMConfig(**MODEL))
    ref = train(ref_model, AllRanks(accum), TrainConfig(**{**TRAIN, "steps": 8, "grad_accum": 2 * accum,
                                                            "keep_checkpoints": 0}),
                OptimConfig(**OPTIM), out_dir=tmp_path / "ref")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    got = json.loads((tmp_path / "fsdp.json").read_text())
    assert got["world"] == 2 and got["sharded"] == "DTensor"
    want = {r["step"]: r for r in ref.history}
    assert [r["step"] for r in got["history"]] == list(range(6))
    for r in got["history"]:
        assert r["loss"] == pytest.approx(want[r["step"]]["loss"], abs=1e-5)
        assert r["grad_norm"] == pytest.approx(want[r["step"]]["grad_norm"], rel=1e-4)
    # Crashed at step 4 and resumed under FSDP from the step-3 checkpoint: the same curve.
    assert [(r["step"], r["loss"]) for r in got["resumed"]] == [(r["step"], r["loss"]) for r in got["history"][3:]]
    # The checkpoint holds full weights by name: it loads into a plain model in this process...
    ck = resolve_checkpoint(tmp_path / "run")
    assert ck.name == "step_000006"
    plain, ref6 = LM(LMConfig(**MODEL)), LM(LMConfig(**MODEL))
    load_weights(plain, ck)
    load_weights(ref6, tmp_path / "ref" / "checkpoints" / "step_000006")
    for (name, a), b in zip(plain.state_dict().items(), ref6.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-5), name
    # ...and resumes here (one process now, so the world size and accumulation change: an override), with the
    # optimizer state intact: steps 6 and 7 continue the reference curve.
    torch.manual_seed(0)
    resumed = train(LM(LMConfig(**MODEL)), AllRanks(accum),
                    TrainConfig(**{**TRAIN, "steps": 8, "grad_accum": 2 * accum, "resume": True,
                                   "resume_override": True}),
                    OptimConfig(**OPTIM), out_dir=tmp_path / "run")
    assert [r["step"] for r in resumed.history] == [6, 7]
    for r in resumed.history:
        assert r["loss"] == pytest.approx(want[r["step"]]["loss"], abs=1e-5)
