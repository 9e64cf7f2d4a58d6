"""Exact attention through torch's scaled_dot_product_attention (flash / memory-efficient / math kernels)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import UserError
from .masks import combine
from .registry import Capabilities, Kernel, register_kernel

_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def _expand_kv(q, k, v):
    hq, hkv = q.shape[1], k.shape[1]
    if hq == hkv:
        return k, v
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} key/value heads")
    return k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)


def exact_attention(q, k, v, *, causal=False, mask=None, scale=None, return_lse=False):
    """Exact softmax attention with the kernel signature of `attnlab.attention.registry`.

    Rows whose mask hides every key return zeros (SDPA alone would return NaN for them).
    """
    nq, nk = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # SDPA's own is_causal aligns top-left; use it only where that coincides with bottom-right.
    sdpa_causal = causal and mask is None and nq == nk
    m = None if sdpa_causal else combine(mask, causal, nq, nk, q.device)
    if _HAS_GQA and q.shape[1] != k.shape[1]:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=sdpa_causal, scale=scale, enable_gqa=True)
        ke, ve = k, v
    else:
        ke, ve = _expand_kv(q, k, v)
        out = F.scaled_dot_product_attention(q, ke, ve, attn_mask=m, is_causal=sdpa_causal, scale=scale)
    if m is not None:
        empty = ~m.any(dim=-1, keepdim=True)
        if bool(empty.any()):
            out = out.masked_fill(empty, 0.0)
    if not return_lse:
        return out
    ke, ve = _expand_kv(q, k, v)
    return out, logsumexp_scores(q, ke, scale, combine(mask, causal, nq, nk, q.device))


def logsumexp_scores(q, k, scale, mask):
    """log Σ_j exp(q·k_j · scale) over visible keys, in float32 at least; -inf for an empty row."""
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(wide), k.to(wide).transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(s, dim=-1)


SDPA_BACKENDS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


@dataclass
class ExactConfig:
    sdpa_backend: str = "auto"
    """SDPA kernel: auto (torch chooses), or one of math, flash, efficient, cudnn. On a CPU, math is the
    faster one for short sequences (a ViT's 17 tokens); torch raises if the chosen one cannot run the inputs."""

    def __post_init__(self):
        if self.sdpa_backend != "auto" and self.sdpa_backend not in SDPA_BACKENDS:
            raise UserError(f"sdpa_backend must be auto or one of {', '.join(SDPA_BACKENDS)}, "
                            f"got {self.sdpa_backend!r}")


@register_kernel("exact", ExactConfig, Capabilities(), "exact softmax attention (torch SDPA)")
class ExactAttention(Kernel):
    """Exact softmax attention (torch SDPA)."""

    def __init__(self, config: ExactConfig | None = None):
        super().__init__(config or ExactConfig())

    def attend(self, q, k, v, *, causal, mask, scale, return_lse):
        if self.config.sdpa_backend == "auto":
            return exact_attention(q, k, v, causal=causal, mask=mask, scale=scale, return_lse=return_lse)
        with sdpa_kernel([SDPA_BACKENDS[self.config.sdpa_backend]]):
            return exact_attention(q, k, v, causal=causal, mask=mask, scale=scale, return_lse=return_lse)
