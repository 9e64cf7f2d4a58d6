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


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(LN(x)), then x + MLP(LN(x)). `causal` is fixed by the model that
    builds it (decoder: True; ViT and forecaster encoders: False); attention keywords pass through."""

    def __init__(self, cfg, attn: nn.Module, *, causal: bool, d_ff: int | None = None):
        super().__init__()
        self.causal = causal
        self.ln1 = make_norm(cfg.norm, cfg.d_model, cfg.bias)
        self.attn = attn
        self.ln2 = make_norm(cfg.norm, cfg.d_model, cfg.bias)
        self.mlp = MLP(cfg.d_model, d_ff or cfg.d_ff or default_d_ff(cfg.d_model, cfg.mlp), cfg.mlp, cfg.bias,
                       cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, **attn_kwargs):
        x = x + self.drop(self.attn(self.ln1(x), causal=self.causal, **attn_kwargs))
        return x + self.mlp(self.ln2(x))
