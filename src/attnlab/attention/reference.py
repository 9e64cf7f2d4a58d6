"""Slow, obviously correct attention in float64: the yardstick every kernel is tested against."""

from __future__ import annotations

import math

import torch

from .masks import combine


def reference_attention(q, k, v, *, causal=False, mask=None, scale=None, return_lse=False):
    """softmax(q kᵀ · scale + mask) v in float64, with grouped-query heads expanded explicitly.

    A row with no visible key returns zeros (and lse = -inf).
    """
    dtype = q.dtype
    q, k, v = q.double(), k.double(), v.double()
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    m = combine(mask, causal, q.shape[2], k.shape[2], q.device)
    if m is not None:
        s = s.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    p = torch.nan_to_num(p, nan=0.0)
    out = torch.einsum("bhqk,bhkd->bhqd", p, v).to(dtype)
    return (out, lse) if return_lse else out
