"""Padded batches for HyperAttention: every sequence is attended as if it had never been padded.

HyperAttention's structure depends on the whole key and query set: queries and keys are sorted and cut into
equal blocks, pre-scoring fits centroids on the keys, the residual is sampled over the key positions, and the
causal recursion splits at half the length. On a padded batch all of these would see the padding, so a real
token's output would move with the pad tokens' content and with how much padding its row carries.

So a key-padding mask ([B, 1, 1, Nk]: the same keys hidden for every head and query) is applied by
compaction: per batch element, the real keys are gathered into a dense sequence and the kernel runs on it
unmasked, with a fresh draw from the configured seed. A real query's output is then exactly the output of
the same sequence without padding (same seed), whatever the pads hold and however many there are.

Which queries are real follows from the self-attention layout: causal calls align query i with key position
nk - nq + i (bottom-right), non-causal calls with as many queries as keys align query i with key i; a
non-causal call with another number of queries (cross-attention) has no padded queries. Queries at padded
positions still get what the mask asks of them, attended separately against the real keys (a causal one sees
the real keys up to its position), so they never shape the blocks or draws of real queries. Should a
non-causal call with equal lengths really be cross-attention, those queries are therefore still answered.
"""

from __future__ import annotations

import torch


def key_padding(mask: torch.Tensor | None, nk: int) -> torch.Tensor | None:
    """[B or 1, Nk] key validity when `mask` (4-D, bool) hides the same keys from every head and query and
    hides at least one; None otherwise (no mask, nothing hidden, or a pattern that varies by query or head)."""
    if mask is None or mask.shape[1] != 1 or mask.shape[2] != 1:
        return None
    keys = mask[:, 0, 0, :].expand(mask.shape[0], nk)
    return None if bool(keys.all()) else keys


def per_sequence(attend, q, k, v, key_valid, *, causal: bool, scale: float):
    """Run `attend(q, k, v, causal=, mask=, scale=) -> (o, lse)` on each sequence's real keys; returns
    (out [B, Hq, Nq, D], lse [B, Hq, Nq]) with the pieces scattered back to their positions."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    dev = q.device
    key_valid = key_valid.expand(b, nk)
    lse_type = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for i in range(b):
        kv = key_valid[i]
        kidx = kv.nonzero().squeeze(-1)
        o = q.new_zeros(hq, nq, d)
        lse = torch.full((hq, nq), float("-inf"), dtype=lse_type, device=dev)
        if kidx.numel():
            ki, vi = k[i : i + 1].index_select(2, kidx), v[i : i + 1].index_select(2, kidx)
            for qidx, q_causal, q_mask in _query_groups(kv, kidx, nq, nk, causal):
                if q_mask is not None and not bool(q_mask.any()):
                    continue  # these queries see no real key: o = 0, lse = -inf
                oc, lc = attend(q[i : i + 1].index_select(2, qidx), ki, vi, causal=q_causal, mask=q_mask,
                                scale=scale)
                o = o.index_copy(1, qidx, oc[0])
                lse = lse.index_copy(1, qidx, lc[0].to(lse_type))
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def _query_groups(kv, kidx, nq, nk, causal):
    """(query indices, causal, mask over the real keys) for the real queries, then for the padded ones."""
    dev = kv.device
    if causal:
        pos = torch.arange(nq, device=dev) + (nk - nq)  # bottom-right: query i sits at key position pos[i]
        real = (pos >= 0) & kv[pos.clamp(min=0)]
    elif nq == nk:
        pos, real = torch.arange(nq, device=dev), kv
    else:
        yield torch.arange(nq, device=dev), False, None
        return
    # The real queries are the newest of the real keys (causal) or all of them: a dense unmasked problem.
    real_q = real.nonzero().squeeze(-1)
    if real_q.numel():
        yield real_q, causal, None
    pad_q = (~real).nonzero().squeeze(-1)
    if pad_q.numel():
        sees = (kidx.view(1, -1) <= pos[pad_q].view(-1, 1)) if causal else None
        if sees is not None and bool(sees.all()):
            sees = None
        yield pad_q, False, None if sees is None else sees.view(1, 1, *sees.shape)
