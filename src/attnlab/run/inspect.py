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


def attention_maps(model: torch.nn.Module, idx: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities [B, H, N, N] (float32, CPU) of every attention layer of `model` reading `idx`.

    Each layer's kernel input (q, k, v after projections, transforms and rotary) is captured by a forward
    pre-hook and softmax(q·kᵀ/√d) is computed here with the causal and explicit masks, whatever mechanism the
    kernel runs: the pattern exact attention would give with the model's own q and k."""
    import math

    from ..attention.masks import combine
    from ..attention.swap import attention_layers

    layers = attention_layers(model)
    seen: dict[int, tuple] = {}

    def hook_for(i):
        def hook(_mod, args, kwargs):
            seen[i] = (args[0].detach(), args[1].detach(), kwargs.get("causal", False), kwargs.get("mask"),
                       kwargs.get("scale"))
        return hook

    handles = [layer.kernel.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for h in handles:
            h.remove()
    maps = []
    for i in range(len(layers)):
        q, k, causal, mask, scale = seen[i]
        q, k = q.float(), k.float()
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        s = (q @ k.transpose(-1, -2)) * scale
        m = combine(mask, causal, q.shape[2], k.shape[2], q.device)
        if m is not None:
            s = s.masked_fill(~m, float("-inf"))
        maps.append(torch.softmax(s, dim=-1).nan_to_num(0.0).cpu())
    return maps


def repeated_random_tokens(vocab_size: int, half: int, batch: int, seed: int) -> torch.Tensor:
    """[batch, 2·half] sequences of `half` uniform random tokens followed by the same tokens again."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, vocab_size, (batch, half), generator=g)
    return torch.cat([r, r], dim=1)


def induction_targets(idx: torch.Tensor) -> torch.Tensor:
    """[B, N] position j+1 of the token after the latest earlier occurrence j of token i, or -1 where token i has
    not occurred before."""
    b, n = idx.shape
    same = idx[:, :, None] == idx[:, None, :]  # [B, i, j]
    earlier = torch.ones(n, n, dtype=torch.bool).tril(-1)
    pos = torch.arange(n).expand(b, n, n)
    last = torch.where(same & earlier, pos, torch.full_like(pos, -1)).amax(-1)
    return torch.where(last >= 0, last + 1, last)


def head_scores(maps: list[torch.Tensor], idx: torch.Tensor) -> list[dict]:
    """One row per (layer, head): mean attention entropy (nats), previous-token score (mean attention of query i
    on key i−1, i ≥ 1) and induction score (mean attention on the token after the previous occurrence of the
    query's token, over queries whose token occurred before; NaN when none did)."""
    tgt = induction_targets(idx.cpu())
    has = tgt >= 0
    rows = []
    for li, p in enumerate(maps):
        p = p.double()
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(dim=(0, 2))
        prev = p.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2)) if p.shape[-1] > 1 else torch.zeros(p.shape[1])
        on_tgt = p.gather(-1, tgt.clamp_min(0)[:, None, :, None].expand(-1, p.shape[1], -1, 1)).squeeze(-1)
        if has.any():
            ind = (on_tgt * has[:, None]).sum(dim=(0, 2)) / has.sum()
        else:
            ind = torch.full((p.shape[1],), float("nan"))
        for h in range(p.shape[1]):
            rows.append({"layer": li, "head": h, "entropy": float(ent[h]) + 0.0, "prev_token": float(prev[h]),
                         "induction": float(ind[h])})
    return rows
