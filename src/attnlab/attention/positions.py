"""Position signals: rotary (applied to q and k inside attention) and additive sinusoidal / learned tables."""

from __future__ import annotations

import math

import torch
from torch import nn


class Rotary(nn.Module):
    """Rotary position embedding (half-split convention), evaluated at explicit absolute positions."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError("rotary needs an even head dimension")
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, H, N, D]; positions: [N] or [B, N] absolute positions."""
        ang = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # [.., N, D/2]
        if ang.dim() == 2:
            ang = ang[None, None]
        else:
            ang = ang[:, None]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def sinusoidal_table(n: int, d: int) -> torch.Tensor:
    """The fixed sinusoidal encoding of "Attention Is All You Need": [n, d]."""
    pos = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(n, d)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : d // 2]
    return pe


class AbsolutePositions(nn.Module):
    """Additive absolute positions, "sinusoidal" (fixed) or "learned", for up to `max_len` tokens."""

    def __init__(self, kind: str, max_len: int, d_model: int):
        super().__init__()
        self.kind = kind
        if kind == "learned":
            self.table = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        else:
            self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]
