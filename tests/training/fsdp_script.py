"""Run by test_fsdp under torchrun with 2 CPU processes (gloo): FSDP2 training with gradient accumulation."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from attnlab.models.lm import LM, LMConfig
from attnlab.training import OptimConfig, TrainConfig, train
from attnlab.tasks import SyntheticConfig, SyntheticTask

sys.path.insert(0, str(Path(__file__).parent))
from test_fsdp import MODEL, OPTIM, TASK, TRAIN  # noqa: E402

out = Path(sys.argv[1])
torch.manual_seed(0)
model = LM(LMConfig(**MODEL))
task = SyntheticTask(SyntheticConfig(**TASK), batch_size=TRAIN["batch_size"], seed=1)
res = train(model, task, TrainConfig(**TRAIN, parallel="fsdp"), OptimConfig(**OPTIM), out_dir=out / "run")
sharded = type(model.blocks[0].attn.q_proj.weight).__name__


class CrashAt4(SyntheticTask):
    def batch(self, step, micro, rank, device):
        if step == 4:
            raise KeyboardInterrupt
        return super().batch(step, micro, rank, device)


def again(task_cls, **kw):
    torch.manual_seed(0)
    return train(LM(LMConfig(**MODEL)), task_cls(SyntheticConfig(**TASK), batch_size=TRAIN["batch_size"], seed=1),
                 TrainConfig(**{**TRAIN, **kw}, parallel="fsdp"), OptimConfig(**OPTIM), out_dir=out / "crashed")


try:
    again(CrashAt4)
except KeyboardInterrupt:
    pass
resumed = again(SyntheticTask, resume=True)  # from step 3, sharded again
if dist.get_rank() == 0:
    (out / "fsdp.json").write_text(json.dumps({"world": dist.get_world_size(), "sharded": sharded,
                                               "history": res.history, "final": res.final,
                                               "resumed": resumed.history}))
dist.destroy_process_group()
