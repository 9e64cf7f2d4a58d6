"""SSA: stochastically subsampled self-attention (Hussain, Zaki, Subramanian, KDD 2023, arXiv 2306.01705).

Each call draws which keys every query may see, once per example, shared by all heads:

- "unbiased": a uniformly random subset of M = ceil(N/S) keys; every query attends to the same subset.
- "local": keys are shuffled by argsort(j + σ·ε_j) (ε ~ N(0, 1), σ = spread·w) so they stay near their
  origin; queries (in order) and shuffled keys are cut into S windows of w = ceil(N/S); query window k sees
  key window k only.

The kept keys and values are gathered, so attention runs over [N × M] (unbiased) or S blocks of [w × w]
(local): compute and score memory fall by about S. Causal masking compares original positions, and rotary
was applied by the layer before the gather, so positions are the original ones too. Every query also sees
its own key, so no row is empty: a "self slot" (score q_i·k_i, value v_i) merged with the gathered keys
through the log-sum-exp. Where the own key was drawn anyway, or the mask hides it, the slot is switched off.

Two implementations compute the same attention:
- On CPU without a caller's mask (language-model training), `ssa.flash`: the queries in blocks, each with
  one maskless fused flash call over the gathered keys before the block and one small masked call over the
  keys inside it, merged with the self slot in place. No [N × M] mask exists, causally hidden blocks are
  skipped, and backward keeps only q, k, v, the output and its lse.
- Otherwise (a padding or document mask, CUDA, or an lse that needs gradients): SDPA over the gathered keys
  with an explicit mask, in a few query chunks (each over the sorted keys up to its last query, so blocks
  that causality hides are skipped). The self slot rides in the same call: the queries get one more
  coordinate holding q_i·k_i and the slot's key is the unit vector on it, so SDPA normalises the sampled
  keys and the own key together, with exact gradients; the slot's value is a unit column whose output
  weight multiplies v_i afterwards.

Modes: "auto" samples only in training (eval runs exact attention); "sample" samples in eval too, for
self-ensembles (`attnlab.inference.ensemble`); "dense" is exact attention with the same weights.
Fewer queries than keys (KV-cache decoding, cross-attention) always runs exact attention: subsampling a
cache a token at a time has no meaning, so cached decoding matches the dense forward pass.

Randomness comes from torch's global RNG (which the trainer checkpoints), or from a generator per kernel
given by `seed_sampling(model, seed)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ...errors import UserError
from ..exact import _HAS_GQA, exact_attention, logsumexp_scores
from ..registry import Capabilities, Kernel, register_kernel
from . import flash

# Score of a switched-off self slot: exp(-1000 - lse) is exactly 0 in every float type, and -1000 stays
# finite so that a row whose only open slot it is gives weights, not NaN (the slot's output is then dropped).
_OFF_SCORE = -1000.0
# Causal attention runs in query chunks of at least this many rows, at most this many chunks.
_CHUNK_ROWS = 256
_MAX_CHUNKS = 4


@dataclass
class SSAConfig:
    """factor: the subsampling factor S (each query sees about N/S keys; 1 = every key).
    sampling: "unbiased" (uniform subset shared by all queries) or "local" (windows of nearby keys).
    spread: local sampling only: standard deviation of the positional noise, in window widths w = N/S
    (0 = contiguous blocks; large = unbiased-like).
    """

    factor: int = 4
    sampling: Literal["unbiased", "local"] = "unbiased"
    spread: float = 1.0

    def __post_init__(self):
        if self.factor < 1:
            raise UserError(f"ssa factor must be at least 1, got {self.factor}")
        if self.spread < 0 or not math.isfinite(self.spread):
            raise UserError(f"ssa spread must be a finite number >= 0, got {self.spread}")


@dataclass
class Draw:
    """One draw for a batch. unbiased: `keys` [B, M] sorted original positions seen by every query.
    local: `keys` [B, S·w] shuffled positions (n marks padding); window k = keys[:, k·w:(k+1)·w], sorted."""

    sampling: str
    n: int
    window: int
    keys: torch.Tensor

    def key_mask(self) -> torch.Tensor:
        """[B, N, N] bool: which (query, key) pairs the draw connects (before causality, masks and self)."""
        b, n = self.keys.shape[0], self.n
        out = torch.zeros(b, n, n, dtype=torch.bool, device=self.keys.device)
        if self.sampling == "unbiased":
            out[torch.arange(b, device=out.device)[:, None], :, self.keys] = True
            return out
        q_win = torch.arange(n, device=out.device) // self.window  # [N]
        k_win = torch.arange(self.keys.shape[1], device=out.device) // self.window  # [S·w]
        real = self.keys < n
        for bi in range(b):
            ks, ws = self.keys[bi][real[bi]], k_win[real[bi]]
            out[bi][:, ks] = q_win[:, None] == ws[None, :]
        return out


def _draw_unbiased(b, n, m, device, generator):
    r = torch.rand(b, n, device=device, generator=generator)
    return r.argsort(dim=-1)[:, :m].sort(dim=-1).values


def _draw_local(b, n, s, w, sigma, device, generator):
    noise = torch.randn(b, n, device=device, generator=generator) * sigma
    perm = (torch.arange(n, device=device, dtype=noise.dtype) + noise).argsort(dim=-1)
    if s * w > n:
        perm = torch.cat([perm, perm.new_full((b, s * w - n), n)], dim=1)
    # Order inside a window does not matter to attention; sorted, a window's keys can be cut causally.
    return perm.view(b, s, w).sort(dim=-1).values.view(b, s * w)


def _normalise_mask(mask, b, nq, nk):
    """Return the mask as a 4-d broadcast view with batch expanded, or None."""
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask.expand(b, mask.shape[1], mask.shape[2], nk)


def _diag(mask, n):
    """[B, Hm, N]: whether each query may see its own key under `mask` (True when there is no mask)."""
    if mask is None:
        return None
    return mask.expand(mask.shape[0], mask.shape[1], n, n).diagonal(dim1=-2, dim2=-1)


def _self_scores(q, k):
    """q_i·k_i per query head: [B, Hq, N] (grouped-query heads share their key)."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    return (q.view(b, hkv, hq // hkv, n, d) * k.unsqueeze(2)).sum(-1).view(b, hq, n)


def _self_values(o_main, alpha, v):
    """o_main + alpha · v_i, with grouped-query heads reading their group's value."""
    b, hq, n, d = o_main.shape
    hkv = v.shape[1]
    if hq == hkv:
        return torch.addcmul(o_main, alpha, v)
    out = torch.addcmul(o_main.reshape(b, hkv, hq // hkv, n, d), alpha.reshape(b, hkv, hq // hkv, n, 1),
                        v.unsqueeze(2))
    return out.view(b, hq, n, d)


def _sdpa(q, k, v, mask, scale):
    if q.shape[1] != k.shape[1]:
        if _HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@register_kernel("ssa", SSAConfig, Capabilities(stochastic=True),
                 "stochastically subsampled attention (SSA): gathers ~N/S keys per query in training")
class SSAAttention(Kernel):
    """Stochastically subsampled attention (SSA)."""

    modes = ("auto", "dense", "sample")

    def __init__(self, config: SSAConfig | None = None):
        super().__init__(config or SSAConfig())
        self.generator: torch.Generator | None = None
        self.last_draw: Draw | None = None

    def sampling_now(self) -> bool:
        return self.mode == "sample" or (self.mode == "auto" and self.training)

    def _generator(self, device):
        g = self.generator
        if g is None or g.device.type == torch.device(device).type:
            return g
        # A seeded generator follows the model to a new device, keeping its seed.
        self.generator = torch.Generator(device=device).manual_seed(g.initial_seed())
        return self.generator

    def attend(self, q, k, v, *, causal, mask, scale, return_lse):
        n = q.shape[2]
        if not self.sampling_now() or k.shape[2] != n:
            return exact_attention(q, k, v, causal=causal, mask=mask, scale=scale, return_lse=return_lse)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        b, s = q.shape[0], self.config.factor
        w = -(-n // s)
        gen = self._generator(q.device)
        if self.config.sampling == "unbiased":
            keys = _draw_unbiased(b, n, w, q.device, gen)
        else:
            keys = _draw_local(b, n, s, w, self.config.spread * w, q.device, gen)
        self.last_draw = Draw(self.config.sampling, n, w, keys)
        return self._attend_draw(q, k, v, self.last_draw, causal, mask, scale, return_lse)

    def _attend_draw(self, q, k, v, draw, causal, mask, scale, return_lse):
        b, hq, n, d = q.shape
        hkv = k.shape[1]
        dev = q.device
        mask = _normalise_mask(mask, b, n, n)
        pos = torch.arange(n, device=dev)
        keys, w = draw.keys, draw.window
        local = draw.sampling == "local"
        s = keys.shape[1] // w if local else 1
        bb, nq = (b * s, w) if local else (b, n)
        kidx = keys.clamp(max=n - 1)  # local padding slots read a real key and are masked below

        # The self slot stays shut where the own key is drawn anyway or the caller's mask hides it.
        drawn = _own_key_drawn(draw)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        # The fused CPU path's lse carries no gradient, so it serves lse requests only without autograd.
        if mask is None and flash.supported(q) and not (return_lse and needs_grad):
            out, lse = flash.gathered_attention(q, k, v, keys, ~drawn, _plan(draw, causal), scale)
            return (out, lse) if return_lse else out
        open_ = ~drawn[:, None, :]
        diag = _diag(mask, n)
        if diag is not None:
            open_ = open_ & diag
        open_ = open_.expand(b, hq, n)

        # Queries get one extra coordinate, the self score; on CUDA, zero padding keeps head dims multiples
        # of 8 as the fused kernels want. Built in [B, N, H, D] order, the projections' own layout.
        dp = d + 1 if dev.type == "cpu" else -(-(d + 1) // 8) * 8
        off = max(_OFF_SCORE / scale, -torch.finfo(q.dtype).max / 8)  # stays finite in half precision
        sself = _self_scores(q, k).masked_fill(~open_, off)
        parts = [q.transpose(1, 2), sself.transpose(1, 2).unsqueeze(-1)]
        if dp > d + 1:
            parts.append(q.new_zeros(1, 1, 1, 1).expand(b, n, hq, dp - d - 1))
        qa = torch.cat(parts, dim=-1)  # [B, N, Hq, dp]
        if local and s * w > n:
            qa = F.pad(qa, (0, 0, 0, 0, 0, s * w - n))
        qa = qa.reshape(bb, nq, hq, dp).transpose(1, 2)

        # Gathered keys/values behind the slot (index 0): its key and value are the unit vector on the extra
        # coordinate, so its score is the self score and its output weight lands in that coordinate.
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)
        bidx = torch.arange(b, device=dev)[:, None]

        def gathered(t):
            g = F.pad(t[bidx, kidx].view(bb, -1, hkv, d), (0, dp - d, 0, 0, 1, 0))
            g[:, 0, :, d] = 1.0
            return g.transpose(1, 2)

        ka, va = gathered(kt), gathered(vt)
        # Original positions in ka's order; the slot (-1) passes every causal and padding test.
        kpos = F.pad(keys.view(bb, -1), (1, 0), value=-1)
        qpos = torch.arange(s * w, device=dev).view(s, w).repeat(b, 1) if local else pos.expand(b, n)
        user = None if mask is None else F.pad(_gather_mask(mask, kidx, local, s, w, n), (1, 0), value=True)
        pad_keys = local and keys.shape[1] > n

        def visible(r0, r1, nk):
            """[bb, 1|Hm, r1-r0, nk] bool for query rows r0:r1 and the first nk keys (slot included)."""
            vis = None
            if causal:
                vis = (kpos[:, None, :nk] <= qpos[:, r0:r1, None])[:, None]
            if pad_keys:
                vis = _and(vis, (kpos[:, None, None, :nk] < n))
            if user is not None:
                vis = _and(vis, user[:, :, r0:r1, :nk] if user.shape[2] > 1 else user[..., :nk])
            return vis

        # Causal: queries in chunks, each with only the (sorted) keys up to its last query, so blocks that
        # causality hides entirely are never computed. kpos rows are sorted, the slot (-1) first.
        chunks = [(0, nq, ka.shape[2])]
        t = min(_MAX_CHUNKS, nq // _CHUNK_ROWS)
        if causal and t >= 2:
            bounds = [round(i * nq / t) for i in range(t + 1)]
            ends = qpos[:, [e - 1 for e in bounds[1:]]].contiguous()
            counts = torch.searchsorted(kpos, ends, right=True).amax(0)
            chunks = [(r0, r1, c) for r0, r1, c in zip(bounds, bounds[1:], counts.tolist())]
        # Split (not slicing) so that backward concatenates the query gradients instead of summing
        # zero-padded full-size copies, one per chunk.
        q_chunks = qa.split([r1 - r0 for r0, r1, _ in chunks], dim=2)
        outs = [_sdpa(qc, ka[:, :, :nk], va[:, :, :nk], visible(r0, r1, nk), scale)
                for qc, (r0, r1, nk) in zip(q_chunks, chunks)]
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        if local:
            o = o.transpose(1, 2).reshape(b, s * w, hq, dp)[:, :n].transpose(1, 2)
        alpha = o[..., d:d + 1] * open_.unsqueeze(-1)
        out = _self_values(o[..., :d], alpha, v)
        if not return_lse:
            return out
        return out, self._lse(qa, ka, visible(0, nq, ka.shape[2]), open_, scale, b, n, local)

    @staticmethod
    def _lse(qa, ka, vis, open_, scale, b, n, local):
        """The log-sum-exp over the keys a query saw (the slot only where open); O(N·M) memory, so it is
        computed only on request."""
        hq = qa.shape[1]
        rep = hq // ka.shape[1]
        ke = ka.repeat_interleave(rep, dim=1) if rep > 1 else ka
        bb, nq, nk = qa.shape[0], qa.shape[2], ka.shape[2]
        slot_open = open_
        if local:
            s = bb // b
            slot_open = F.pad(open_, (0, s * nq - n)).view(b, hq, s, nq).transpose(1, 2).reshape(bb, hq, nq)
        m = torch.ones(bb, hq, nq, nk, dtype=torch.bool, device=qa.device)
        if vis is not None:
            m = m & vis
        m[..., 0] = slot_open
        lse = logsumexp_scores(qa, ke, scale, m)
        if local:
            lse = lse.view(b, bb // b, hq, nq).transpose(1, 2).reshape(b, hq, -1)[:, :, :n]
        return lse


def _plan(draw: Draw, causal: bool):
    """The query blocks of `ssa.flash` for a draw: one window of all queries over the M keys (unbiased), or
    query window k over the real keys of key window k (local; padding keys sit at the end of the last)."""
    n, w = draw.n, draw.window
    if draw.sampling == "unbiased":
        return flash.plan(draw.keys, [(0, n, 0, draw.keys.shape[1])], causal)
    s = draw.keys.shape[1] // w
    wins = [(i * w, min(n, (i + 1) * w), i * w, i * w + min(n - i * w, w)) for i in range(s) if i * w < n]
    return flash.plan(draw.keys, wins, causal)


def _own_key_drawn(draw: Draw) -> torch.Tensor:
    """[B, N] bool: whether each query's own key is among the keys its window drew."""
    b, n, w = draw.keys.shape[0], draw.n, draw.window
    dev = draw.keys.device
    if draw.sampling == "local":
        rank = torch.full((b, n + 1), -1, dtype=draw.keys.dtype, device=dev)
        rank.scatter_(1, draw.keys, torch.arange(draw.keys.shape[1], device=dev).expand(b, -1))
        return (rank[:, :n] // w) == (torch.arange(n, device=dev) // w)
    return torch.zeros(b, n, dtype=torch.bool, device=dev).scatter_(1, draw.keys, True)


def _and(a, b):
    return b if a is None else a & b


def _gather_mask(mask, kidx, local, s, w, n):
    """The caller's mask [B, Hm, Nq|1, N] restricted to the gathered keys: [bb, Hm, nq|1, nk]."""
    b, hm, mq, _ = mask.shape
    if not local:
        return torch.gather(mask, 3, kidx[:, None, None, :].expand(b, hm, mq, kidx.shape[1]))
    if mq == 1:
        g = torch.gather(mask, 3, kidx[:, None, None, :].expand(b, hm, 1, kidx.shape[1]))  # [B, Hm, 1, S·w]
        return g.view(b, hm, 1, s, w).permute(0, 3, 1, 2, 4).reshape(b * s, hm, 1, w)
    rows = F.pad(mask, (0, 0, 0, s * w - n), value=False) if s * w > n else mask
    rows = rows.reshape(b, hm, s, w, n)
    idx = kidx.view(b, 1, s, 1, w).expand(b, hm, s, w, w)
    g = torch.gather(rows, 4, idx)  # [B, Hm, S, w(q), w(k)]
    return g.permute(0, 2, 1, 3, 4).reshape(b * s, hm, w, w)


def seed_sampling(model: torch.nn.Module, seed: int | None) -> None:
    """Give every SSA kernel in `model` its own generator (seed + its order in the model), or with None,
    return them to torch's global RNG. Layers get different seeds so their draws stay independent."""
    for i, m in enumerate(x for x in model.modules() if isinstance(x, SSAAttention)):
        if seed is None:
            m.generator = None
            continue
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        m.generator = torch.Generator(device=dev).manual_seed(int(seed) * 1_000_003 + i)
