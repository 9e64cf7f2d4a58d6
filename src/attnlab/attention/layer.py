"""Multi-head attention: project -> key/value transform -> rotary -> kernel -> output projection.

The layer knows nothing about which kernel or transform it holds; both come from the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .positions import Rotary
from .registry import Kernel, Transform


@dataclass
class LayerCache:
    """What one attention layer keeps between decoding calls."""

    k: torch.Tensor | None = None  # [B, Hkv, T, D], after transform and rotary
    v: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # [B, T] bool key padding, None = all valid
    state: dict = field(default_factory=dict)  # the transform's own carry-over (e.g. the last raw k, v)

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


class MultiHeadAttention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_head: int,
        kernel: Kernel,
        *,
        n_kv_head: int | None = None,
        head_dim: int | None = None,
        transform: Transform | None = None,
        rotary: Rotary | None = None,
        bias: bool = False,
        d_context: int | None = None,
        need: dict[str, bool] | None = None,
    ):
        super().__init__()
        # The capabilities this layer's use requires of any kernel it holds (checked again when one is swapped in).
        self.need = dict(need or {})
        self.n_head = n_head
        self.n_kv_head = n_kv_head or n_head
        if n_head % self.n_kv_head:
            raise ValueError(f"n_head={n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        self.head_dim = head_dim or d_model // n_head
        self.q_proj = nn.Linear(d_model, n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_context or d_model, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_context or d_model, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_head * self.head_dim, d_model, bias=bias)
        self.kernel = kernel
        self.transform = transform
        self.rotary = rotary

    def _heads(self, x, h):
        b, n, _ = x.shape
        return x.view(b, n, h, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x: [B, N, d]. context: [B, M, d_context] keys/values source for cross-attention (default: x);
        with a context, `valid` is the context's key padding.

        mask: extra boolean mask broadcastable to [B, H, N, T] (e.g. documents); valid: [B, N] key padding
        of the new tokens; reset: [B, N] where the transform must not look back; positions: [N] or [B, N]
        absolute positions for rotary; cache: filled and extended in place when given.
        """
        q = self._heads(self.q_proj(x), self.n_head)
        if context is not None:
            return self._cross(q, context, mask=mask, valid=valid, cache=cache)
        k = self._heads(self.k_proj(x), self.n_kv_head)
        v = self._heads(self.v_proj(x), self.n_kv_head)
        if self.transform is not None:
            k, v, new_state = self.transform(k, v, reset=reset, state=cache.state if cache is not None else None)
        if self.rotary is not None:
            q = self.rotary(q, positions)
            k = self.rotary(k, positions)
        if cache is not None:
            if valid is None and cache.valid is not None:
                valid = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
            if cache.k is not None:
                if cache.valid is not None or valid is not None:
                    old = cache.valid if cache.valid is not None else torch.ones(
                        k.shape[0], cache.length, dtype=torch.bool, device=k.device
                    )
                    valid = torch.cat([old, valid], dim=1)
                k = torch.cat([cache.k, k], dim=2)
                v = torch.cat([cache.v, v], dim=2)
            cache.k, cache.v, cache.valid = k, v, valid
            if self.transform is not None:
                cache.state = new_state
        return self._attend(q, k, v, causal=causal, mask=mask, valid=valid)

    def _cross(self, q, context, *, mask, valid, cache):
        """Cross-attention: keys come from `context` (no rotary, no transform); a cache keeps them fixed."""
        if cache is not None and cache.k is not None:
            k, v, valid = cache.k, cache.v, cache.valid
        else:
            k = self._heads(self.k_proj(context), self.n_kv_head)
            v = self._heads(self.v_proj(context), self.n_kv_head)
            if cache is not None:
                cache.k, cache.v, cache.valid = k, v, valid
        return self._attend(q, k, v, causal=False, mask=mask, valid=valid)

    def _attend(self, q, k, v, *, causal, mask, valid):
        if valid is not None:
            pad = valid[:, None, None, :]
            mask = pad if mask is None else (mask & pad)
        y = self.kernel(q, k, v, causal=causal, mask=mask, scale=None)
        b, h, n, d = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(b, n, h * d))
