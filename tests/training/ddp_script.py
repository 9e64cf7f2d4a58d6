"""Run by test_trainer under torchrun with 2 CPU processes (gloo)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from attnlab.models.lm import LM, LMConfig
from attnlab.training import OptimConfig, TrainConfig, train
from attnlab.tasks import SyntheticConfig, SyntheticTask

out = Path(sys.argv[1])
torch.manual_seed(0)  # identical initial replicas, as DDP expects
model = LM(LMConfig(vocab_size=32, n_layer=1, n_head=2, d_model=32, max_seq_len=32))
task = SyntheticTask(SyntheticConfig(vocab_size=32, seq_len=32, eval_batches=2), batch_size=4, seed=1)
res = train(model, task, TrainConfig(steps=6, eval_every=0, log_every=1, device="cpu", progress=False, tensorboard=False),
            OptimConfig(lr=3e-3, warmup_steps=1), out_dir=out / "run")
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if dist.get_rank() == 0:
    diff = max((g - gathered[0]).abs().max().item() for g in gathered)
    (out / "ddp.json").write_text(json.dumps({
        "world": dist.get_world_size(), "max_param_diff": diff,
        "first_loss": res.history[0]["loss"], "last_loss": res.history[-1]["loss"]}))
dist.destroy_process_group()
