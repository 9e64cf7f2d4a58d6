"""Pathway pruning: exact attention that keeps only some connections per query, then renormalises.

An analysis tool, not a fast kernel: it computes every score (dense cost, dense memory) and then drops
connections, to ask how many attention pathways a trained model actually needs. Methods:

- topk: the highest-scoring ceil(keep · visible) keys of each query (or exactly `top_k` of them);
- topp: the smallest set of highest-probability keys whose softmax mass reaches `keep` (nucleus);
- random: the same count as topk, chosen uniformly among the visible keys (the control). The draw is a fixed
  function of `seed` and the shapes, so repeated calls (and every evaluation batch of a given shape) prune
  the same connections and the output is reproducible.

Every query keeps at least one visible key; the causal flag and the mask are honoured before choosing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import UserError
from .registry import Capabilities, Kernel, register_kernel


@dataclass
class PruneConfig:
    method: Literal["topk", "topp", "random"] = "topk"
    """which connections survive: topk (highest scores), topp (nucleus of the softmax mass), random (control)"""
    keep: float = 1.0
    """topk/random: fraction of each query's visible keys kept (rounded up, at least one); topp: the mass p"""
    top_k: int = 0
    """topk/random: keep exactly this many keys per query (fewer where fewer are visible); 0: use `keep`"""
    seed: int = 0
    """seed of the random method's draw"""

    def __post_init__(self):
        if not 0.0 < self.keep <= 1.0:
            raise UserError(f"prune keep must be in (0, 1], got {self.keep}")
        if self.top_k < 0:
            raise UserError(f"prune top_k must be 0 (use keep) or positive, got {self.top_k}")
        if self.top_k and self.method == "topp":
            raise UserError("prune top_k applies to method topk or random, not topp (its mass is `keep`)")


def _ranks(score: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim, 0 = largest; ties broken by position so counts are exact."""
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))
    return ranks


def keep_mask(s: torch.Tensor, visible: torch.Tensor, cfg: PruneConfig, row: int = 0) -> torch.Tensor:
    """Boolean [..., Nq, Nk]: the connections kept, given scores `s` (already -inf where not visible); `row`: the
    first query's index, so that query chunks make different random draws."""
    n_vis = visible.sum(-1, keepdim=True)
    if cfg.method == "topp":
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        order = torch.argsort(s, dim=-1, descending=True, stable=True)
        sorted_p = p.gather(-1, order)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the keys ranked above
        keep_sorted = (before < cfg.keep) & (sorted_p > 0)
        keep_sorted[..., 0] = True
        kept = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        return kept & visible
    if cfg.top_k:
        count = n_vis.clamp(max=cfg.top_k)
    else:
        count = torch.ceil(n_vis.to(torch.float64) * cfg.keep).to(n_vis.dtype)
    count = count.clamp(min=1)
    if cfg.method == "random":
        # A CPU generator keeps 32 bits of its seed: fold seed and row into them.
        g = torch.Generator(device="cpu").manual_seed((cfg.seed * 1_000_003 + row) % 2**32)
        draw = torch.rand(s.shape, generator=g, dtype=torch.float32).to(s.device)
        rank_by = draw.masked_fill(~visible, -1.0)
    else:
        rank_by = s
    return (_ranks(rank_by) < count) & visible


def pruned_attention(q, k, v, cfg: PruneConfig, *, causal=False, mask=None, scale=None, return_lse=False,
                     chunk_elems: int = 1 << 24):
    """softmax over the kept connections of each query, times v; rows with no visible key return zeros.

    Queries go in chunks of about `chunk_elems` scores, so memory stays bounded at long contexts (the time
    stays dense)."""
    nq, nk = q.shape[2], k.shape[2]
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    kw, vw = k.to(wide), v.to(wide)
    rows = max(1, chunk_elems // max(1, q.shape[0] * hq * nk))
    outs, lses = [], []
    for a in range(0, nq, rows):
        b = min(nq, a + rows)
        m = _chunk_mask(mask, causal, a, b, nq, nk, q.device)
        o, lse = _chunk(q[:, :, a:b].to(wide), kw, vw, cfg, m, scale, a)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs, dim=2).to(q.dtype)
    return (out, torch.cat(lses, dim=2)) if return_lse else out


def _chunk_mask(mask, causal, a, b, nq, nk, device):
    """The visibility of query rows a..b: the explicit mask's rows (or its broadcast row) and causality."""
    m = None
    if mask is not None:
        m = mask[..., a:b, :] if mask.shape[-2] == nq and nq > 1 else mask
    if causal:
        qi = torch.arange(a, b, device=device).unsqueeze(1) + (nk - nq)
        c = torch.arange(nk, device=device).unsqueeze(0) <= qi
        m = c if m is None else (m & c)
    return m


def _chunk(q, k, v, cfg, m, scale, row):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    visible = torch.ones_like(s, dtype=torch.bool) if m is None else m.expand_as(s)
    s = s.masked_fill(~visible, float("-inf"))
    with torch.no_grad():
        kept = keep_mask(s.detach(), visible, cfg, row)
    # A row with nothing visible gets finite dummy scores and is zeroed after: all -inf would give NaN gradients.
    empty = ~kept.any(dim=-1, keepdim=True)
    s = s.masked_fill(~kept, float("-inf")).masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(empty.squeeze(-1), float("-inf"))
    return torch.matmul(p, v), lse


@register_kernel("prune", PruneConfig, Capabilities(analysis=True),
                 "analysis, dense cost: exact scores, keeps the top-k / top-p / random connections per query "
                 "and renormalises")
class PrunedAttention(Kernel):
    """Analysis, dense cost: exact attention restricted to each query's top-k / top-p / random connections."""

    small_options = {"keep": 0.1}

    def attend(self, q, k, v, *, causal, mask, scale, return_lse):
        return pruned_attention(q, k, v, self.config, causal=causal, mask=mask, scale=scale, return_lse=return_lse)
