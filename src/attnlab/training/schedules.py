"""Learning-rate schedules, as multipliers of the peak learning rate."""

from __future__ import annotations

import math


def lr_at(step: int, *, schedule: str, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate for 0-based `step`.

    cosine: linear warmup to `lr`, then cosine decay to `min_lr` at `total`.
    inverse_sqrt: the schedule of "Attention Is All You Need",
        lr_t = d_model^-0.5 · min(t^-0.5, t · warmup^-1.5) with t = step + 1,
      written as lr · sqrt(warmup) · min(t^-0.5, t · warmup^-1.5) so that `lr` is the peak (reached at
      t = warmup); the paper's exact values follow from lr = (d_model · warmup)^-0.5 (see `noam_peak_lr`).
    constant: linear warmup, then `lr`.
    """
    t = step + 1
    if schedule == "inverse_sqrt":
        w = max(1, warmup)
        return lr * math.sqrt(w) * min(t ** -0.5, t * w ** -1.5)
    if warmup > 0 and t <= warmup:
        return lr * t / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = min(1.0, (t - warmup) / max(1, total - warmup))
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def noam_peak_lr(d_model: int, warmup: int) -> float:
    """Peak learning rate of the paper's schedule: d_model^-0.5 · warmup^-0.5."""
    return (d_model * warmup) ** -0.5
