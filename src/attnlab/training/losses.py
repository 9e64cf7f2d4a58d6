"""Losses for sequence models: cross-entropy with label smoothing (Szegedy et al. 2016), padding ignored.

Label smoothing trains against q = (1 − ε)·onehot(y) + ε·u with u uniform over the V classes, so

    loss = −Σ_k q_k log p_k = (1 − ε)·(−log p_y) + ε·(−(1/V) Σ_k log p_k).

"Attention Is All You Need" uses ε = 0.1: it "hurts perplexity, as the model learns to be more unsure, but
improves accuracy and BLEU".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SmoothedLoss:
    loss: torch.Tensor  # mean smoothed loss over counted tokens (what is optimised)
    nll: torch.Tensor  # mean plain negative log-likelihood over the same tokens (for perplexity)
    tokens: int  # how many target tokens counted


def label_smoothed_loss(logits: torch.Tensor, target: torch.Tensor, epsilon: float = 0.1,
                        ignore_index: int | None = None) -> SmoothedLoss:
    """logits [..., V], target [...]: the smoothed loss and the plain NLL, averaged over non-ignored tokens."""
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {epsilon}")
    logp = F.log_softmax(logits.float(), dim=-1).flatten(0, -2)
    target = target.flatten()
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    safe = target.masked_fill(~keep, 0)
    nll = -logp.gather(1, safe[:, None]).squeeze(1)
    uniform = -logp.mean(dim=1)
    loss = (1.0 - epsilon) * nll + epsilon * uniform
    n = int(keep.sum())
    denom = max(n, 1)
    w = keep.to(loss.dtype)
    return SmoothedLoss((loss * w).sum() / denom, (nll * w).sum() / denom, n)


def smoothed_target_entropy(vocab_size: int, epsilon: float) -> float:
    """Lowest value the smoothed loss can reach (at p = q): the entropy of the smoothed target q."""
    on = 1.0 - epsilon + epsilon / vocab_size
    off = epsilon / vocab_size
    h = -on * math.log(on)
    if off > 0:
        h -= (vocab_size - 1) * off * math.log(off)
    return h
