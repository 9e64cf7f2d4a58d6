"""Boolean masks (True = may attend) shared by kernels and layers."""

from __future__ import annotations

import torch


def causal_mask(nq: int, nk: int, device=None) -> torch.Tensor:
    """[nq, nk] causal mask aligned bottom-right: query i sits at absolute position nk - nq + i.

    With a KV cache the queries are the newest positions, so bottom-right is the only alignment that
    makes cached decoding equal the full forward pass.
    """
    qi = torch.arange(nq, device=device).unsqueeze(1) + (nk - nq)
    kj = torch.arange(nk, device=device).unsqueeze(0)
    return kj <= qi


def combine(mask: torch.Tensor | None, causal: bool, nq: int, nk: int, device=None) -> torch.Tensor | None:
    """Fold the causal flag into an explicit boolean mask (None when nothing is masked)."""
    if not causal:
        return mask
    c = causal_mask(nq, nk, device)
    return c if mask is None else (mask & c)

