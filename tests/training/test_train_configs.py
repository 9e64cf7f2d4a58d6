"""Training and optimizer configs refuse bad values when they are made, with one line naming the option."""

import pytest

from attnlab.config import from_dict
from attnlab.errors import UserError
from attnlab.training import OptimConfig, TrainConfig


@pytest.mark.parametrize("change, needle", [
    ({"steps": 0}, "train.steps must be positive, got 0"),
    ({"batch_size": 0}, "train.batch_size"),
    ({"grad_accum": 0}, "train.grad_accum"),
    ({"log_every": 0}, "train.log_every must be positive, got 0"),
    ({"eval_every": -1}, "train.eval_every must be 0 or more"),
    ({"save_every": -5}, "train.save_every"),
    ({"keep_checkpoints": -1}, "train.keep_checkpoints"),
    ({"dense_finetune_steps": -1}, "train.dense_finetune_steps"),
    ({"steps": 10, "dense_finetune_steps": 11}, "must not exceed train.steps (10)"),
    ({"seed": -1}, "train.seed"),
    ({"seed": 2 ** 40}, "train.seed"),
    ({"dtype": "fp8"}, "train.dtype must be one of auto, float32, bfloat16, float16"),
    ({"device": "gpu"}, "train.device"),
    ({"early_stop_metric": "val_loss"}, "needs train.early_stop_value"),
    ({"early_stop_value": 1.0}, "needs train.early_stop_metric"),
    ({"early_stop_metric": "acc", "early_stop_value": float("inf")}, "finite"),
    ({"early_stop_mode": "lowest"}, "train.early_stop_mode must be one of max, min"),
    ({"parallel": "tp"}, "train.parallel must be one of ddp, fsdp"),
])
def test_train_config_refuses(change, needle):
    with pytest.raises(UserError) as e:
        TrainConfig(**change)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("change, needle", [
    ({"lr": -1.0}, "optim.lr must be positive, got -1.0"),
    ({"lr": 0.0}, "optim.lr"),
    ({"lr": float("nan")}, "optim.lr"),
    ({"lr": float("inf")}, "optim.lr"),
    ({"min_lr": -1e-5}, "optim.min_lr"),
    ({"lr": 1e-4, "min_lr": 1e-3}, "optim.min_lr (0.001) must not exceed optim.lr (0.0001)"),
    ({"warmup_steps": -1}, "optim.warmup_steps"),
    ({"weight_decay": -0.1}, "optim.weight_decay"),
    ({"beta1": 1.0}, "optim.beta1 must be in [0, 1)"),
    ({"beta2": -0.1}, "optim.beta2"),
    ({"eps": 0.0}, "optim.eps"),
    ({"grad_clip": -1.0}, "optim.grad_clip"),
    ({"schedule": "linear"}, "optim.schedule"),
])
def test_optim_config_refuses(change, needle):
    with pytest.raises(UserError) as e:
        OptimConfig(**change)
    assert needle in str(e.value)


def test_valid_settings_pass():
    TrainConfig(device="cuda:1", dtype="float16", eval_every=0, save_every=0, keep_checkpoints=0,
                dense_finetune_steps=2000, early_stop_metric="accuracy", early_stop_value=0.9, parallel="fsdp")
    OptimConfig(lr=1e-4, min_lr=1e-3, schedule="inverse_sqrt")  # min_lr is unused outside cosine
    OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=0, grad_clip=0.0, beta1=0.0)


def test_checked_when_parsed():
    with pytest.raises(UserError, match="train.log_every"):
        from_dict(TrainConfig, {"log_every": 0})
    with pytest.raises(UserError, match="optim.lr"):
        from_dict(OptimConfig, {"lr": -1})
