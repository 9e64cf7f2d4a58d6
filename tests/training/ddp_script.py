"""Run by test_trainer under torchrun with 2 CPU processes (gloo): train, then crash and resume, with dropout."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from attnlab.models.lm import LM, LMConfig
from attnlab.training import OptimConfig, TrainConfig, train
from attnlab.tasks import SyntheticConfig, SyntheticTask

out = Path(sys.argv[1])


class Crash(RuntimeError):
    pass


class CrashAt(SyntheticTask):
    def batch(self, step, micro, rank, device):
        if step == 4:
            raise Crash()
        return super().batch(step, micro, rank, device)


def run(task_cls, folder, **kw):
    torch.manual_seed(0)  # identical initial replicas, as DDP expects
    model = LM(LMConfig(vocab_size=32, n_layer=1, n_head=2, d_model=32, max_seq_len=32, dropout=0.1))
    task = task_cls(SyntheticConfig(vocab_size=32, seq_len=32, eval_batches=2), batch_size=4, seed=1)
    cfg = TrainConfig(steps=6, eval_every=0, save_every=3, log_every=1, device="cpu", progress=False,
                      tensorboard=False, **kw)
    return model, train(model, task, cfg, OptimConfig(lr=3e-3, warmup_steps=1), out_dir=out / folder)


model, res = run(SyntheticTask, "run")
try:
    run(CrashAt, "crashed")
except Crash:
    pass
resumed_model, resumed = run(SyntheticTask, "crashed", resume=True)
diffs = []
for m in (model, resumed_model):
    flat = torch.cat([p.detach().flatten() for p in m.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    diffs.append(max((g - gathered[0]).abs().max().item() for g in gathered))
if dist.get_rank() == 0:
    (out / "ddp.json").write_text(json.dumps({
        "world": dist.get_world_size(), "max_param_diff": max(diffs),
        "first_loss": res.history[0]["loss"], "last_loss": res.history[-1]["loss"],
        "history": res.history, "resumed": resumed.history,
        "same_weights": all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))}))
dist.destroy_process_group()
