"""`attnlab eval`: loss, perplexity (e-based) or task accuracy of a trained run, under any attention mode."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from ..errors import UserError


@dataclass
class Config:
    ckpt: str = ""
    """a run folder (its latest checkpoint) or one checkpoint folder (required)"""
    data: str = ""
    """score this text instead of the validation split of the text the model was trained on"""
    context: int = 0
    """tokens per window; 0: the model's max_seq_len"""
    batch_size: int = 8
    """windows per batch"""
    batches: int = 50
    """at most this many batches"""
    split: Literal["auto", "val", "train", "test"] = "auto"
    """which split to score; auto: val for a language model or images, test for a forecaster"""
    mode: Literal["auto", "dense", "sample"] = "auto"
    """auto: each kernel's own evaluation behaviour; dense: exact attention with the same weights; sample:
    stochastic kernels keep subsampling"""
    ensemble: int = 1
    """> 1: average the probabilities of this many stochastic passes (a self-ensemble; implies mode sample)"""
    tta: Literal["none", "flip"] = "none"
    """images: flip also scores each image mirrored left-right and averages the two class probabilities
    (test-time augmentation; sensible for models trained with flips)"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N"""
    dtype: str = "auto"
    """autocast dtype: auto, float32, bfloat16"""
    seed: int = 0
    """seed of the stochastic passes"""
    out: str = ""
    """where tasks that draw pictures (confusion matrices, forecasts) put them; default RUN/eval"""

    def __post_init__(self):
        for name in ("batch_size", "batches", "ensemble"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.context < 0:
            raise UserError(f"context must be >= 0 (0: the model's max_seq_len), got {self.context}")


def main(cfg: Config) -> dict:
    from ..run.kinds import kind
    from ..run.load import load_run
    from ..training.device import resolve_device

    if not cfg.ckpt:
        raise UserError("--ckpt is required")
    run = load_run(cfg.ckpt)
    device, amp = resolve_device(cfg.device, cfg.dtype)
    run.model.to(device).eval()
    metrics = kind(run.kind).evaluate(run, cfg, device, amp)
    result = {"ckpt": str(run.ckpt), "task": run.kind, "mode": cfg.mode, "ensemble": cfg.ensemble, **metrics}
    print(json.dumps(result, indent=2))
    return result
