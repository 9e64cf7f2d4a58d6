"""Norms, MLPs and the pre-norm residual block shared by the models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(kind: str, d: int, bias: bool = False) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(d)
    return nn.LayerNorm(d, bias=bias)


class MLP(nn.Module):
    """GELU MLP, or SwiGLU (gate * silu) with the same parameter budget when d_ff is derived."""

    def __init__(self, d: int, d_ff: int, kind: str = "gelu", bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.kind = kind
        self.up = nn.Linear(d, d_ff * (2 if kind == "swiglu" else 1), bias=bias)
        self.down = nn.Linear(d_ff, d, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        h = self.up(x)
        if self.kind == "swiglu":
            a, g = h.chunk(2, dim=-1)
            h = F.silu(g) * a
        else:
            h = F.gelu(h)
        return self.drop(self.down(h))


def default_d_ff(d: int, kind: str) -> int:
    # SwiGLU has three matrices; 8/3·d keeps its parameters equal to a 4·d GELU MLP.
    return 4 * d if kind == "gelu" else int(8 * d / 3 + 63) // 64 * 64
