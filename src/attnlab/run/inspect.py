"""What a trained model learned, read off its modules."""

from __future__ import annotations

import torch

from ..attention.kv_shift import KVShift


def shift_coefficients(model: torch.nn.Module) -> list[dict]:
    """One row per (layer, KV head) with the learned mixing weights: alpha_0 (own key), alpha_1 (previous
    key), …, and beta_j likewise for values. The paper's α1, α2 are our alpha_0, alpha_1."""
    rows = []
    layer = 0
    for m in model.modules():
        if not isinstance(m, KVShift):
            continue
        coefs = {name: c.detach().float().cpu() for name, c in m.coefficients().items()}
        n_heads = next(iter(coefs.values())).shape[0]
        for h in range(n_heads):
            row = {"layer": layer, "head": h}
            for name, c in coefs.items():
                row.update({f"{name}_{j}": float(c[h, j]) for j in range(c.shape[1])})
            rows.append(row)
        layer += 1
    return rows
