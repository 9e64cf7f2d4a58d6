"""KV shifting (Xu et al., "KV Shifting Attention Enhances Language Modeling", arXiv 2411.19574).

Each key (value) becomes a learned per-head mix of its own projection and its predecessors':

    K̂_i = α_0·K_i + α_1·K_{i-1} (+ … + α_w·K_{i-w})        V̂_i likewise with β

i.e. a causal depthwise convolution along the sequence with one kernel per key/value head, applied to the raw
projections before rotary. Window 1 is the paper's (four scalars per KV head: α1, α2, β1, β2 in its notation
are our α_0, α_1, β_0, β_1).

A shift never reaches across a `reset` (a document start, or a token after padding): there the missing
predecessors count as zeros, exactly like the zero the paper pads before the first token. Decoding keeps the
raw last `window` projections in the layer's cache state, so a token at the start of a call mixes with the
true previous projection; keeping the *shifted* one (as the paper's appendix code appears to) would be wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import UserError
from .registry import Transform, register_transform


@dataclass
class KVShiftConfig:
    """shift: which of keys/values are shifted; window: how many predecessors a token mixes with (the paper
    uses 1); constraint: "none" (the paper's), "sigmoid" (each coefficient is sigmoid of a free parameter)
    or "clamp" (each coefficient is its parameter clamped to [0, 1])."""

    shift: Literal["kv", "k", "v"] = "kv"
    window: int = 1
    constraint: Literal["none", "sigmoid", "clamp"] = "none"


def init_coefficients(n_heads: int, window: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[n_heads, window + 1] mixing weights that sum to one per head, own-token weight ~ U(0, 1).

    For window 1 this is the paper's α1 ~ U(0, 1), α2 = 1 − α1. Wider windows share the remainder 1 − α_0
    among the predecessors in random proportions, so the mix starts as a convex combination as well.
    """
    own = torch.rand(n_heads, 1, generator=generator)
    if window == 1:
        return torch.cat([own, 1 - own], dim=1)
    share = torch.rand(n_heads, window, generator=generator) + 1e-3  # keeps every lag's share positive
    return torch.cat([own, (1 - own) * share / share.sum(dim=1, keepdim=True)], dim=1)


def lag_allowed(reset: torch.Tensor, window: int) -> torch.Tensor:
    """[B, N] resets -> [window, B, N] bool: may token i mix with token i - j (j = 1..window)?

    Token i may look back j steps only if no reset lies in (i - j, i]; positions before the call (the
    cached tail or the zero padding) count as reachable unless a reset blocks them.
    """
    n = reset.shape[1]
    pos = torch.arange(n, device=reset.device)
    last = torch.where(reset, pos, torch.full_like(pos, -window - 1)).cummax(dim=1).values
    lags = torch.arange(1, window + 1, device=reset.device)[:, None, None]
    return pos - lags >= last


@register_transform("kv_shift", KVShiftConfig, "KV shifting: keys/values mix with their predecessors' (learned per head)")
class KVShift(Transform):
    """Shift keys and/or values by a learned per-head causal convolution of width `window + 1`."""

    def __init__(self, config: KVShiftConfig | None = None, *, n_kv_head: int = 1, head_dim: int = 1):
        config = config or KVShiftConfig()
        super().__init__(config, n_kv_head=n_kv_head, head_dim=head_dim)
        if config.window < 1:
            raise UserError(f"kv_shift window must be at least 1, got {config.window}")
        self.window = config.window
        self.shift_k = "k" in config.shift
        self.shift_v = "v" in config.shift
        # Raw parameters; `coefficients()` maps them through the constraint, so every mode starts from the
        # same mixing weights and differs only in how training may move them.
        if self.shift_k:
            self.alpha = nn.Parameter(self._to_raw(init_coefficients(n_kv_head, self.window)))
        if self.shift_v:
            self.beta = nn.Parameter(self._to_raw(init_coefficients(n_kv_head, self.window)))

    def _to_raw(self, coef: torch.Tensor) -> torch.Tensor:
        if self.config.constraint == "sigmoid":
            return torch.logit(coef.clamp(1e-4, 1 - 1e-4))
        return coef

    def _effective(self, raw: torch.Tensor) -> torch.Tensor:
        if self.config.constraint == "sigmoid":
            return torch.sigmoid(raw)
        if self.config.constraint == "clamp":
            return raw.clamp(0.0, 1.0)
        return raw

    def coefficients(self) -> dict[str, torch.Tensor]:
        """Effective mixing weights, [n_kv_head, window + 1] each: "alpha" for keys, "beta" for values."""
        out = {}
        if self.shift_k:
            out["alpha"] = self._effective(self.alpha)
        if self.shift_v:
            out["beta"] = self._effective(self.beta)
        return out

    def forward(self, k, v, *, reset=None, state=None):
        allowed = None if reset is None else lag_allowed(reset.to(k.device), self.window)
        state, new_state = state or {}, {}
        if self.shift_k:
            k, new_state["k"] = self._shift(k, self._effective(self.alpha), allowed, state.get("k"))
        if self.shift_v:
            v, new_state["v"] = self._shift(v, self._effective(self.beta), allowed, state.get("v"))
        return k, v, new_state

    def _shift(self, x, coef, allowed, prev):
        """x: [B, H, N, D]; coef: [H, w + 1]; allowed: [w, B, N] or None; prev: raw [B, H, w, D] or None."""
        w, n = self.window, x.shape[2]
        prev = None if prev is None else prev.to(x.dtype)
        out = _ShiftFn.apply(x, coef, prev, allowed, w)
        tail = x
        if n < w:  # a call shorter than the window keeps part of the older tail (or of the zero padding)
            tail = torch.cat([prev if prev is not None else x.new_zeros(*x.shape[:2], w, x.shape[3]), x], dim=2)
        tail = tail[:, :, -w:]
        if allowed is not None and w > 1:
            # A kept projection older than the call's last reset is unreachable from any later token.
            tail = tail * self._tail_reachable(allowed, n)[:, None, :, None].to(x.dtype)
        return out, tail

    def _tail_reachable(self, allowed, n):
        """[B, w] bool: can the token right after this call still reach each of the last w positions?

        Tail slot s (0 = oldest) sits w - s steps before that next token; it is reachable iff the last
        token could look back w - s - 1 steps (slot w-1 is the last token itself, always reachable).
        """
        w = self.window
        cols = [allowed[w - s - 2, :, n - 1] for s in range(w - 1)]
        return torch.stack(cols + [torch.ones_like(allowed[0, :, n - 1])], dim=1)


def _lag_weight(coef, allowed, j, dtype):
    """Weight of lag j per target, broadcastable to [B, N, H, D]: [H, 1], or [B, N, H, 1] with resets."""
    c = coef[:, j].to(dtype)[:, None]
    return c if allowed is None else allowed[j - 1][:, :, None, None].to(dtype) * c


def _rows(t, lo, hi):
    return t if t.dim() == 2 else t[:, lo:hi]


def _lag_spans(n, o, j):
    """For lag j: targets [lo_x, n) read x[i − j]; targets [lo_p, hi_p) read the kept prev[o + i − j]."""
    return j, max(0, j - o), min(j, n)


class _ShiftFn(torch.autograd.Function):
    """out_i = c_0·x_i + Σ_j c_j·m_j(i)·x_{i−j} (x_{i−j} from `prev` before the call, zero before that).

    Hand-written so that each lag costs one fused multiply-add over the sequence in either direction and no
    padded copy is made: the transform is memory-bound, so its overhead is the number of passes over k and v.
    Inputs are [B, H, N, D] views of projections laid out [B, N, H, D]; the work runs in that memory order
    (sequence as dim 1), where every pass is a plain contiguous sweep.
    """

    @staticmethod
    def forward(ctx, x, coef, prev, allowed, w):
        xs = x.transpose(1, 2)
        ps = None if prev is None else prev.transpose(1, 2)
        n, o = xs.shape[1], 0 if ps is None else ps.shape[1]
        out = xs * coef[:, 0].to(x.dtype)[:, None]
        for j in range(1, w + 1):
            wj = _lag_weight(coef, allowed, j, x.dtype)
            lo_x, lo_p, hi_p = _lag_spans(n, o, j)
            if n > lo_x:
                out[:, lo_x:].addcmul_(xs[:, : n - j], _rows(wj, lo_x, n))
            if ps is not None and lo_p < hi_p:
                out[:, lo_p:hi_p].addcmul_(ps[:, o + lo_p - j: o + hi_p - j], _rows(wj, lo_p, hi_p))
        ctx.save_for_backward(x, coef, prev, allowed)
        ctx.w = w
        return out.transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, coef, prev, allowed = ctx.saved_tensors
        # The gradient may arrive laid out [B, H, N, D] (from SDPA) while x is [B, N, H, D]: one copy into a
        # common order turns every pass below into a contiguous sweep instead of a strided one.
        xs, gs = x.transpose(1, 2).contiguous(), g.transpose(1, 2).contiguous()
        ps = None if prev is None else prev.transpose(1, 2)
        w, n, o = ctx.w, xs.shape[1], 0 if ps is None else ps.shape[1]
        need_x, need_c, need_p = ctx.needs_input_grad[:3]
        acc = torch.promote_types(g.dtype, torch.float32)  # sums over B·N·D terms: never in half precision
        gc, spare = _coef_grad(gs, xs, allowed, w, acc) if need_c else (None, None)
        gx = None
        if need_x:  # the products' buffer is free again: reusing it spares a fresh allocation
            out = spare.view_as(gs) if spare is not None and spare.dtype == g.dtype else None
            gx = torch.mul(gs, coef[:, 0].to(g.dtype)[:, None], out=out)
        gp = torch.zeros_like(ps) if need_p else None
        for j in range(1, w + 1):
            wj = _lag_weight(coef, allowed, j, g.dtype)
            lo_x, lo_p, hi_p = _lag_spans(n, o, j)
            if need_x and n > lo_x:
                gx[:, : n - j].addcmul_(gs[:, lo_x:], _rows(wj, lo_x, n))
            if ps is None or lo_p >= hi_p:
                continue
            src = slice(o + lo_p - j, o + hi_p - j)
            if need_p:
                gp[:, src].addcmul_(gs[:, lo_p:hi_p], _rows(wj, lo_p, hi_p))
            if need_c:
                prod = gs[:, lo_p:hi_p] * ps[:, src]
                if allowed is not None:
                    prod = prod * allowed[j - 1, :, lo_p:hi_p, None, None].to(prod.dtype)
                gc[:, j] += prod.sum(dim=(0, 1, 3), dtype=acc)
        t = lambda a: None if a is None else a.transpose(1, 2)  # noqa: E731
        return t(gx), None if gc is None else gc.to(coef.dtype), t(gp), None, None


def _coef_grad(gs, xs, allowed, w, acc):
    """Σ over batch, targets i and channels of g_i · x_{i−j} (masked by `allowed`; x within the call only) as
    [H, w + 1], and the scratch buffer of the products.

    Batch and sequence are flattened into one token axis, so lag j pairs token rows t and t − j of two
    [B·N, H·D] matrices; a weight per target row (zero across a sequence start or a reset) then reduces the
    rows in one matrix-vector product. Column sums are cheap where a reduction over (B, N, D) keeping H is not.
    """
    b, n, h, d = xs.shape
    gf, xf = gs.view(b * n, h * d).to(acc), xs.view(b * n, h * d).to(acc)
    prod = gf * xf
    cols = [prod.sum(0)]
    pos = torch.arange(n, device=xs.device)
    for j in range(1, w + 1):
        if n <= j:
            cols.append(prod.new_zeros(h * d))
            continue
        ok = (pos >= j).expand(b, n)
        if allowed is not None:
            ok = ok & allowed[j - 1]
        torch.mul(gf[j:], xf[:-j], out=prod[j:])
        cols.append(ok.reshape(-1)[j:].to(acc) @ prod[j:])
    return torch.stack(cols, 1).view(h, d, w + 1).sum(1), prod
