"""HyperAttention (Han et al. 2023) with optional key pre-scoring (the 2025 pre-scoring paper).

Non-causal (every query against every key, `_rect`):
1. sortLSH: hash queries and keys with the same random hyperplanes, sort each by bucket in Gray-code order
   (`hyper.lsh`), cut the sorted keys into blocks of `block_size` and the sorted queries into as many
   blocks; every query attends exactly to the keys of its own block. Padding up to a whole number of blocks
   is masked (the official code fills it with zero keys, which get logit 0 and act as a spurious sink;
   `zero_pad=True` reproduces that, to measure what masking buys).
2. Residual: `sample_size` keys drawn uniformly without replacement; every query attends to them except the
   ones in its own block (no double counting), with weight n/sample_size: an unbiased estimate of the
   softmax denominator and numerator over the keys outside the block.
3. Pre-scoring (`prescore`): the `top_k` highest-scoring keys (`hyper.prescore`) join the residual with
   weight 1, i.e. they are attended exactly (again minus the query's own block); the uniform sample is then
   drawn from the other keys only, weighted (n - top_k)/sample_size.
The pieces cover disjoint key sets. A query's own block and its residual keys go through one softmax in which
each residual key carries log(weight) as an additive bias: the exact log-sum-exp merge of the parts, fused
into one kernel call (faster than separate calls merged afterwards, which `attention.merge` would do).

Causal: exact below `min_seq_len`; above it the sequence splits in halves, the two diagonal halves recurse,
and the lower-left rectangle (second-half queries, first-half keys) is the non-causal algorithm, merged into
the second half through the log-sum-exp (`attention.merge`). So pre-scoring only acts where the kernel
approximates. Fewer queries than keys (a KV cache) are the newest positions: the older keys form one more
non-causal rectangle; a decoding step (at most `block_size` queries) is exact.

Grouped-query attention: keys are hashed, sorted and scored once per kv head; the query heads sharing them
are stacked into the same blocks. Masks: a key-padding mask ([B, 1, 1, Nk]) runs each sequence on its real
keys alone (`hyper.padding`), so real tokens' outputs do not depend on the padding's content or amount; a
per-head key mask sorts masked keys last and masks them; a general mask is gathered for exactly the
(query, key) pairs that are computed.

Exact pieces run through SDPA kernels that return the log-sum-exp (`hyper.lse.attention_lse`); when gradients are
needed they run as plain differentiable math instead, so the kernel trains too (slowly). Without gradients,
pieces are written into one output buffer and merged in place, a few heads at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F

from ...errors import UserError
from ..masks import combine
from ..merge import merge, merge_
from ..registry import Capabilities, Kernel, make_config, register_kernel
from . import lsh, padding
from .lse import attention_lse, lse_dtype, mask_bias
from .prescore import METHODS, key_scores


@dataclass
class HyperConfig:
    """lsh_bits: hyperplanes per hash (2**bits buckets). block_size: keys per diagonal block.
    sample_size: uniformly sampled residual keys per (batch, kv head). min_seq_len: exact attention up to this
    many keys (causal: the recursion's leaves). seed: an int makes every call draw the same hyperplanes and
    samples (deterministic); null draws from torch's global RNG.
    prescore: none | kmeans | kmedian | leverage | norm (norm = the cheap ‖k‖² proxy, not a leverage score).
    kmedian_distance: "euclidean" (the papers' k-median: k-means' assignment and score, median centroids) or
    "l1" (textbook k-medians: L1 assignment and score; dearer).
    top_k: keys per (batch, kv head) that pre-scoring sends to exact attention; the key budget of a query is
    then block_size + top_k + sample_size. clusters: k-means/k-median clusters (default max(1, min(256,
    top_k // 4)), as in the official code); iters: Lloyd rounds (default 10 for kmeans, 3 for kmedian);
    fit_size: keys the centroids are fitted on (drawn uniformly; all keys still get scored).
    zero_pad: ablation only: fill block padding with attended zero keys, as the official code does.
    """

    lsh_bits: int = 7
    block_size: int = 256
    sample_size: int = 256
    min_seq_len: int = 4096
    seed: int | None = 0
    prescore: Literal["none", "kmeans", "kmedian", "leverage", "norm"] = "none"
    top_k: int = 256
    clusters: int | None = None
    iters: int | None = None
    fit_size: int = 1024
    kmedian_distance: Literal["euclidean", "l1"] = "euclidean"
    zero_pad: bool = False

    def __post_init__(self):
        checks = [
            (1 <= self.lsh_bits <= 16, "lsh_bits must be between 1 and 16"),
            (self.block_size >= 1, "block_size must be at least 1"),
            (self.sample_size >= 0, "sample_size must be 0 or more"),
            # Without a residual every query sees only its own block: the denominator is not estimated at all.
            (self.sample_size >= 1 or self.prescore != "none",
             "sample_size must be at least 1 without pre-scoring (else a query sees only its own block)"),
            (self.min_seq_len >= 1, "min_seq_len must be at least 1"),
            (self.top_k >= 0, "top_k must be 0 or more"),
            (self.top_k >= 1 or self.prescore == "none", "top_k must be at least 1 with pre-scoring"),
            (self.clusters is None or self.clusters >= 1, "clusters must be at least 1"),
            (self.iters is None or self.iters >= 0, "iters must be 0 or more"),
            (self.fit_size >= 1, "fit_size must be at least 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"hyper: {msg}")

    @property
    def n_clusters(self) -> int:
        return self.clusters if self.clusters is not None else max(1, min(256, self.top_k // 4))

    @property
    def n_iters(self) -> int:
        return self.iters if self.iters is not None else (3 if self.prescore == "kmedian" else 10)


# ----------------------------------------------------------------------------------------------------------
# HyperAttention.

# Working set of one piece of work: (batch, kv head) matrices are processed a few at a time so that the
# temporaries stay near this size. On CPU that keeps them in cache and in the allocator's reusable heap:
# fresh allocations of tens of MB are page-faulted in on every call, which costs as much as the attention.
_CHUNK_BYTES = 16 * 2**20


@dataclass
class _Ctx:
    cfg: HyperConfig
    scale: float
    gen: torch.Generator | None
    inplace: bool  # no autograd: pieces are written into buffers and merged in place


def hyper_attention(q, k, v, cfg: HyperConfig, *, causal=False, mask=None, scale=None):
    """HyperAttention with the kernel signature; returns (out [B, Hq, Nq, D], lse [B, Hq, Nq] float32)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if hq % hkv:
        raise UserError(f"hyper: {hq} query heads cannot share {hkv} key/value heads")
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mask = mask.to(torch.bool)
        key_valid = padding.key_padding(mask, nk)
        if key_valid is not None:
            # Each sequence on its own real keys: padding never shapes the blocks, scores or draws (`padding`).
            return padding.per_sequence(partial(hyper_attention, cfg=cfg), q, k, v, key_valid, causal=causal,
                                        scale=scale)
    gen = None
    if cfg.seed is not None:
        gen = torch.Generator(device=q.device).manual_seed(cfg.seed)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    ctx = _Ctx(cfg, scale, gen, inplace=not grad)
    # Chunks: a few kv heads of one sequence, or (when every head fits) a few whole sequences.
    per_head = max(nq * g, nk) * d * q.element_size()
    heads = max(1, min(hkv, _CHUNK_BYTES // max(per_head, 1)))
    seqs = max(1, min(b, _CHUNK_BYTES // max(per_head * hkv, 1))) if heads == hkv else 1
    out = None
    if ctx.inplace:
        out = (q.new_empty(b, hq, nq, d), torch.empty(b, hq, nq, dtype=lse_dtype(q), device=q.device))
    pieces = []
    for b0 in range(0, b, seqs):
        sb = slice(b0, min(b, b0 + seqs))
        row = []
        for h0 in range(0, hkv, heads):
            h1 = min(hkv, h0 + heads)
            qh, kh = slice(h0 * g, h1 * g), slice(h0, h1)
            m = None
            if mask is not None:
                m = mask[sb] if mask.shape[0] > 1 else mask
                m = m[:, qh] if m.shape[1] > 1 else m
            dst = None if out is None else (out[0][sb, qh], out[1][sb, qh])
            row.append(_run(q[sb, qh], k[sb, kh], v[sb, kh], m, causal, ctx, dst))
        pieces.append(row)
    if out is not None:
        return out
    return (torch.cat([torch.cat([p[0] for p in row], 1) for row in pieces], 0),
            torch.cat([torch.cat([p[1] for p in row], 1) for row in pieces], 0))


def _run(q, k, v, mask, causal, ctx, out):
    if causal:
        return _causal(q, k, v, mask, ctx, out)
    if k.shape[2] <= ctx.cfg.min_seq_len:
        return _emit(_exact(q, k, v, mask, False, ctx), out)
    return _emit(_rect(q, k, v, mask, ctx), out)


def _emit(res, out):
    """Return a piece's (o, lse), or copy it into the caller's buffers when there are buffers."""
    if out is None:
        return res
    out[0].copy_(res[0])
    out[1].copy_(res[1])
    return out


def _merge(acc, part, ctx):
    """Fold `part` into `acc` (in place without autograd: acc is then a buffer this call owns)."""
    return merge_(*acc, *part) if ctx.inplace else merge(*acc, *part)


def _sub(mask, qs: slice, ks: slice):
    """Slice a broadcastable [B, H, Nq, Nk] mask to a query range and a key range."""
    if mask is None:
        return None
    return mask[:, :, qs if mask.shape[2] > 1 else slice(None), ks if mask.shape[3] > 1 else slice(None)]


def _exact(q, k, v, mask, causal, ctx):
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    nq, nk = q.shape[2], k.shape[2]
    if causal and mask is None and nq == nk:
        return attention_lse(q, k, v, scale=ctx.scale, causal=True)
    return attention_lse(q, k, v, scale=ctx.scale, mask=combine(mask, causal, nq, nk, q.device))


def _causal(q, k, v, mask, ctx, out):
    """Causal attention aligned bottom-right (query i sits at key position nk - nq + i)."""
    nq, nk = q.shape[2], k.shape[2]
    if nq < nk:
        # The prefix keys precede every query: a non-causal piece, then a square causal one.
        p = nk - nq
        pre_m = _sub(mask, slice(None), slice(0, p))
        if p <= ctx.cfg.min_seq_len:
            pre = _exact(q, k[:, :, :p], v[:, :, :p], pre_m, False, ctx)
        else:
            pre = _rect(q, k[:, :, :p], v[:, :, :p], pre_m, ctx)
        sq = _causal_square(q, k[:, :, p:], v[:, :, p:], _sub(mask, slice(None), slice(p, None)), ctx, out)
        return _merge(sq, pre, ctx)
    if nq > nk:
        # The first nq - nk queries precede every key: empty rows.
        e = nq - nk
        rest = _sub(mask, slice(e, None), slice(None))
        if out is None:
            o, lse = _causal_square(q[:, :, e:], k, v, rest, ctx, None)
            o = torch.cat([o.new_zeros(*o.shape[:2], e, o.shape[3]), o], dim=2)
            return o, torch.cat([lse.new_full((*lse.shape[:2], e), float("-inf")), lse], dim=2)
        out[0][:, :, :e].zero_()
        out[1][:, :, :e].fill_(float("-inf"))
        _causal_square(q[:, :, e:], k, v, rest, ctx, (out[0][:, :, e:], out[1][:, :, e:]))
        return out
    return _causal_square(q, k, v, mask, ctx, out)


def _causal_square(q, k, v, mask, ctx, out):
    n = q.shape[2]
    if n <= ctx.cfg.min_seq_len:
        return _emit(_exact(q, k, v, mask, True, ctx), out)
    h = n // 2
    a, z = slice(0, h), slice(h, n)
    halves = (None, None) if out is None else ((out[0][:, :, a], out[1][:, :, a]), (out[0][:, :, z], out[1][:, :, z]))
    o1, l1 = _causal_square(q[:, :, a], k[:, :, a], v[:, :, a], _sub(mask, a, a), ctx, halves[0])
    o2, l2 = _causal_square(q[:, :, z], k[:, :, z], v[:, :, z], _sub(mask, z, z), ctx, halves[1])
    o2, l2 = _merge((o2, l2), _rect(q[:, :, z], k[:, :, a], v[:, :, a], _sub(mask, z, a), ctx), ctx)
    if out is not None:
        return out
    return torch.cat([o1, o2], dim=2), torch.cat([l1, l2], dim=2)


def _gather_rows(x, idx):
    """x [B, H, N, D], idx [B, H, M] -> [B, H, M, D].

    index_select on flat rows (several times faster on CPU than gather with an expanded index); a strided view
    whose rows are whole D-vectors is read in place, without first copying it to contiguous memory.
    """
    b, h, n, d = x.shape
    sb, sh, sn, sd = x.stride()
    if not x.requires_grad and sd == 1 and sn == d and sb % d == 0 and sh % d == 0 and x.storage_offset() % d == 0:
        start = x.storage_offset() // d
        last = start + (b - 1) * (sb // d) + (h - 1) * (sh // d) + n
        rows = x.as_strided((last - start, d), (d, 1))
        offs = torch.arange(b, device=idx.device).view(b, 1, 1) * (sb // d) + torch.arange(h, device=idx.device).view(1, h, 1) * (sh // d)
    else:
        rows = x.reshape(b * h * n, d)
        offs = torch.arange(0, b * h * n, n, device=idx.device).view(b, h, 1)
    return rows.index_select(0, (idx + offs).reshape(-1)).view(b, h, idx.shape[-1], d)


def _rect(q, k, v, mask, ctx):
    """Non-causal HyperAttention: sortLSH diagonal blocks + exact pre-scored keys + sampled residual."""
    cfg = ctx.cfg
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    bs = cfg.block_size
    if nk <= bs or nq <= bs:
        # Nothing to gain: exact costs at most what the blocks would (a decoding step lands here too).
        return _exact(q, k, v, mask, False, ctx)
    dev = q.device
    nb = -(-nk // bs)
    bq = -(-nq // nb)
    nk_pad, nq_pad = nb * bs, nb * bq

    # The mask is either about keys only (padding: one row broadcast over queries, one per kv head at most)
    # or general, in which case its entries are gathered for every (query, key) pair that gets computed.
    key_valid, full = None, None
    if mask is not None:
        if mask.shape[2] == 1 and (mask.shape[1] == 1 or g == 1):
            key_valid = mask[:, :, 0, :].expand(b, hkv, nk)
        else:
            full = mask.expand(b, hq, nq, nk)

    proj = lsh.projections(d, cfg.lsh_bits, generator=ctx.gen, device=dev)
    # Hashes and scores only choose keys: no gradient flows through them, so none is recorded.
    q_rank = lsh.bucket_ranks(q.detach(), proj)
    k_rank = lsh.bucket_ranks(k.detach(), proj)
    if key_valid is not None:
        k_rank = k_rank.masked_fill(~key_valid, 2**cfg.lsh_bits)  # masked keys sort last: blocks stay full
    q_perm = lsh.sort_by_bucket(q_rank)  # [B, Hq, Nq]: sorted position -> original index
    k_perm = lsh.sort_by_bucket(k_rank)
    q_perm_p = F.pad(q_perm, (0, nq_pad - nq))  # padded query rows repeat row 0 and are dropped at the end
    k_perm_p = F.pad(k_perm, (0, nk_pad - nk))
    k_pos = torch.empty_like(k_perm).scatter_(2, k_perm, torch.arange(nk, device=dev).expand_as(k_perm))

    def to_blocks(x):  # [B, Hq, nq_pad, ...] (sorted queries) -> [B·Hkv, nb, G·bq, ...]
        x = x.reshape(b, hkv, g, nb, bq, *x.shape[3:]).transpose(2, 3)
        return x.reshape(b * hkv, nb, g * bq, *x.shape[5:])

    def from_blocks(x):  # inverse of to_blocks, then drop the padded query rows
        x = x.reshape(b, hkv, nb, g, bq, *x.shape[3:]).transpose(2, 3)
        return x.reshape(b, hq, nq_pad, *x.shape[5:])[:, :, :nq]

    qb = to_blocks(_gather_rows(q, q_perm_p))
    ks, vs = _gather_rows(k, k_perm_p), _gather_rows(v, k_perm_p)
    is_pad = (torch.arange(nk_pad, device=dev) >= nk).expand(b, hkv, nk_pad)
    if cfg.zero_pad and nk_pad > nk:
        ks, vs = ks.masked_fill(is_pad.unsqueeze(-1), 0.0), vs.masked_fill(is_pad.unsqueeze(-1), 0.0)
    # Which sorted key slots a query may attend in its block: padding is masked unless zero_pad says otherwise.
    slot_ok = None
    if nk_pad > nk and not cfg.zero_pad:
        slot_ok = ~is_pad
    if key_valid is not None:
        kv_sorted = key_valid.gather(2, k_perm_p) | (is_pad if cfg.zero_pad else torch.zeros_like(is_pad))
        slot_ok = kv_sorted if slot_ok is None else (slot_ok & kv_sorted)
    blk_mask = None if slot_ok is None else slot_ok.reshape(b * hkv, nb, 1, bs)
    if full is not None:
        bi = torch.arange(b, device=dev).view(b, 1, 1, 1, 1)
        hi = torch.arange(hq, device=dev).view(1, hq, 1, 1, 1)
        cols = k_perm_p.repeat_interleave(g, dim=1).view(b, hq, nb, 1, bs)
        pair = to_blocks(full[bi, hi, q_perm_p.view(b, hq, nb, bq, 1), cols].reshape(b, hq, nq_pad, bs))
        if not cfg.zero_pad:
            pair = pair & ~is_pad.reshape(b * hkv, nb, 1, bs)
        blk_mask = pair if blk_mask is None else (blk_mask & pair)
    keys, values = [ks.view(b * hkv, nb, bs, d)], [vs.view(b * hkv, nb, bs, d)]
    wide = lse_dtype(q)
    biases = [torch.zeros(1, 1, 1, bs, dtype=wide, device=dev) if blk_mask is None else mask_bias(blk_mask, wide)]

    # Residual: exact pre-scored keys (weight 1) and a uniform sample of the others (weight n_rest / m).
    picks = []
    n_sel = 0
    if cfg.prescore != "none":
        scores = key_scores(k.detach(), cfg.prescore, clusters=cfg.n_clusters, iters=cfg.n_iters, fit_size=cfg.fit_size,
                            kmedian_l1=cfg.kmedian_distance == "l1", generator=ctx.gen).float()
        if key_valid is not None:
            scores = scores.masked_fill(~key_valid, float("-inf"))
        n_sel = min(cfg.top_k, nk)
        picks.append((scores.topk(n_sel, dim=-1).indices, 0.0))
    m = min(cfg.sample_size, nk - n_sel)
    if m > 0:
        r = torch.rand(b, hkv, nk, generator=ctx.gen, device=dev)
        if n_sel:
            r = r.scatter(2, picks[0][0], -1.0)  # selected keys are never sampled
        picks.append((r.topk(m, dim=-1).indices, math.log((nk - n_sel) / m)))
    for idx, log_w in picks:
        s = idx.shape[-1]
        # Keys that fell in the query's own block were counted there already.
        home = (k_pos.gather(2, idx) // bs).view(b * hkv, 1, 1, s)
        ok = home != torch.arange(nb, device=dev).view(1, nb, 1, 1)
        if key_valid is not None:
            ok = ok & key_valid.gather(2, idx).view(b * hkv, 1, 1, s)
        if full is not None:
            bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
            hi = torch.arange(hq, device=dev).view(1, hq, 1, 1)
            cols = idx.repeat_interleave(g, dim=1).view(b, hq, 1, s)
            ok = ok & to_blocks(full[bi, hi, q_perm_p.view(b, hq, nq_pad, 1), cols])
        keys.append(_gather_rows(k, idx).view(b * hkv, 1, s, d).expand(b * hkv, nb, s, d))
        values.append(_gather_rows(v, idx).view(b * hkv, 1, s, d).expand(b * hkv, nb, s, d))
        biases.append(torch.full(ok.shape, log_w, dtype=wide, device=dev).masked_fill_(~ok, float("-inf")))
    # One softmax over [own block ; residual keys], the residual weighted through the bias: the log-sum-exp
    # merge of the parts, fused into a single kernel call (longer key rows also run faster than two calls).
    if len(biases) > 1:
        rows = max(x.shape[2] for x in biases)
        bias = torch.cat([x.expand(b * hkv, nb, rows, x.shape[-1]) for x in biases], dim=-1)
    else:  # the own block alone: its all-zero bias would only slow the kernel down
        bias = None if blk_mask is None else biases[0]
    acc = attention_lse(qb, torch.cat(keys, dim=2) if len(keys) > 1 else keys[0],
                        torch.cat(values, dim=2) if len(values) > 1 else values[0], scale=ctx.scale, bias=bias)

    o, lse = from_blocks(acc[0]), from_blocks(acc[1])
    # Un-sort the query rows.
    q_pos = torch.empty_like(q_perm).scatter_(2, q_perm, torch.arange(nq, device=dev).expand_as(q_perm))
    return _gather_rows(o, q_pos), lse.gather(2, q_pos)


@register_kernel("hyper", HyperConfig, Capabilities(stochastic=True),
                 "HyperAttention: sortLSH blocks + sampled residual, optional key pre-scoring")
class HyperAttention(Kernel):
    """HyperAttention (sortLSH diagonal blocks + uniformly sampled residual), optionally with pre-scored keys."""

    small_options = {"block_size": 64, "sample_size": 64, "min_seq_len": 256}
    paired_designs = {" zero-pad": ("padded_rows", "masked", "zero_pad")}

    @classmethod
    def bench_variants(cls, options: dict, study: str) -> dict[str, dict]:
        """Each pre-scoring method at the key budget of `options`: `top_k` (given in `options`; default half
        the sample budget) of the `sample_size` residual keys are pre-scored instead of sampled. The error
        study adds the zero-padding design (the official code's), which draws what masked padding draws."""
        budget = make_config(HyperConfig, options, "attention 'hyper'").sample_size
        top_k = min(options.get("top_k") or max(1, budget // 2), budget)
        out = {" zero-pad": {**options, "zero_pad": True}} if study == "error" else {}
        for m in METHODS:
            out[f"+{m}"] = {**options, "prescore": m, "top_k": top_k, "sample_size": budget - top_k}
        return out

    def attend(self, q, k, v, *, causal, mask, scale, return_lse):
        o, lse = hyper_attention(q, k, v, self.config, causal=causal, mask=mask, scale=scale)
        return (o, lse) if return_lse else o
