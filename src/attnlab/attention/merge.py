"""Exact merge of partial softmax attentions through their log-sum-exp.

Attention over a union of disjoint key sets equals a convex mix of the attentions over each set, weighted by
exp(lse_part - lse_union). Every approximate kernel assembles its output from pieces this way.
"""

from __future__ import annotations

import torch


def merge(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor):
    """Merge two partial attentions over disjoint key sets.

    o*: [..., N, D]; lse*: [..., N] (natural log; -inf for a part with no keys). Returns (o, lse).
    A row with no keys in either part gets o = 0 and lse = -inf, never NaN.
    """
    lse = torch.logaddexp(lse1, lse2)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    # Weights in float32 at least: bf16 weights would lose the small part entirely (float64 stays float64).
    wide = _wide(o1, lse1)
    w1 = torch.where(finite, torch.exp(lse1.to(wide) - safe.to(wide)), torch.zeros_like(lse1, dtype=wide))
    w2 = torch.where(finite, torch.exp(lse2.to(wide) - safe.to(wide)), torch.zeros_like(lse2, dtype=wide))
    o = o1.to(wide) * w1.unsqueeze(-1) + o2.to(wide) * w2.unsqueeze(-1)
    return o.to(o1.dtype), lse


def _wide(o, lse):
    return torch.promote_types(torch.promote_types(o.dtype, lse.dtype), torch.float32)


def merge_many(parts):
    """Merge a sequence of (o, lse) pairs over pairwise disjoint key sets."""
    it = iter(parts)
    o, lse = next(it)
    for o2, lse2 in it:
        o, lse = merge(o, lse, o2, lse2)
    return o, lse


def merge_(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor):
    """In-place `merge` into (o1, lse1), for inference: no temporaries the size of o (a kernel assembling
    long sequences from many pieces is otherwise dominated by them). Not for tensors that need gradients.

    Uses o = o1 + w2·(o2 - o1), which is `merge` because the weights sum to 1 on rows with any key.
    """
    lse = torch.logaddexp(lse1, lse2)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    wide = _wide(o1, lse1)
    w2 = torch.where(finite, torch.exp(lse2.to(wide) - safe.to(wide)), torch.zeros_like(lse2, dtype=wide))
    o1.lerp_(o2, w2.unsqueeze(-1).to(o1.dtype))
    lse1.copy_(lse)
    return o1, lse1
