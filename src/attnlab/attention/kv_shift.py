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

    def __post_init__(self):
        if self.window < 1:
            raise UserError(f"kv_shift window must be at least 1, got {self.window}")


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
        self.window = config.window
        self.shift_k = "k" in config.shift
        self.shift_v = "v" in config.shift
        # Raw parameters; `coefficients()` maps them through the constraint, so every mode starts from the
        # same mixing weights and differs only in how training may move them.
        if self.shift_k:
            self.alpha = nn.Parameter(self._to_raw(init_coefficients(self.n_kv_head, self.window)))
        if self.shift_v:
            self.beta = nn.Parameter(self._to_raw(init_coefficients(self.n_kv_head, self.window)))

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


def _per_channel(coef, d, dtype):
    """[H, w + 1] -> [w + 1, H, D]: each head's weight repeated over its channels. Against a full [H, D]
    weight the (H, D) dims of every operand merge into one contiguous sweep; broadcasting one scalar per head
    over D instead made the passes about 2× slower."""
    return coef.t().to(dtype)[:, :, None].expand(-1, -1, d).contiguous()


def _lag_spans(n, o, j):
    """Rows of lag j: (targets, source, source rows). Targets [j, n) read x[i − j]; targets before j read the
    kept `prev` (o rows, the last at o − 1), as far as it reaches."""
    if n > j:
        yield slice(j, n), "x", slice(0, n - j)
    lo, hi = max(0, j - o), min(j, n)
    if o and lo < hi:
        yield slice(lo, hi), "p", slice(o + lo - j, o + hi - j)


def _masked(t, allowed, j, rows):
    """t: [B, r, H, D] rows feeding `rows` targets; zero where lag j crosses a reset there."""
    return t if allowed is None else t * allowed[j - 1, :, rows, None, None].to(t.dtype)


class _ShiftFn(torch.autograd.Function):
    """out_i = c_0·x_i + Σ_j c_j·m_j(i)·x_{i−j} (x_{i−j} from `prev` before the call, zero before that).

    Hand-written so that each lag costs one fused multiply-add over the sequence in either direction and no
    padded copy is made: the transform is memory-bound, so its cost is the number of passes over k and v and
    the buffers it allocates. Everything runs on [B, N, H, D] views (sequence as dim 1), whatever the memory
    order of the projections and of the incoming gradient, so that no operand is ever copied into another
    order; outputs are laid out [B, N, H, D], the order of the projections that feed the shift.
    """

    @staticmethod
    def forward(ctx, x, coef, prev, allowed, w):
        xv = x.transpose(1, 2)
        src = {"x": xv, "p": None if prev is None else prev.transpose(1, 2)}
        o = 0 if prev is None else prev.shape[2]
        cc = _per_channel(coef, x.shape[3], x.dtype)
        out = torch.empty_like(xv, memory_format=torch.contiguous_format)
        torch.mul(xv, cc[0], out=out)
        for j in range(1, w + 1):
            for rows, which, srows in _lag_spans(xv.shape[1], o, j):
                out[:, rows].addcmul_(_masked(src[which][:, srows], allowed, j, rows), cc[j])
        ctx.save_for_backward(x, coef, prev, allowed)
        ctx.w = w
        return out.transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, coef, prev, allowed = ctx.saved_tensors
        w, d = ctx.w, x.shape[3]
        gv, xv = g.transpose(1, 2), x.transpose(1, 2)
        pv = None if prev is None else prev.transpose(1, 2)
        o = 0 if prev is None else prev.shape[2]
        need_x, need_c, need_p = ctx.needs_input_grad[:3]
        # One buffer serves the scalar gradients' products and then the input gradient, which the projection's
        # backward would otherwise have to copy out of the gradient's [B, H, N, D] order: the shift allocates
        # no more in backward than vanilla attention does.
        buf = torch.empty(gv.shape, dtype=g.dtype, device=g.device) if need_x or need_c else None
        gc = _coef_grad(gv, xv, pv, allowed, w, buf) if need_c else None
        cc = _per_channel(coef, d, g.dtype)
        grads = {"x": torch.mul(gv, cc[0], out=buf) if need_x else None,
                 "p": torch.zeros_like(pv) if need_p else None}
        for j in range(1, w + 1):
            for rows, which, srows in _lag_spans(gv.shape[1], o, j):
                if grads[which] is not None:
                    grads[which][:, srows].addcmul_(_masked(gv[:, rows], allowed, j, rows), cc[j])
        gc = None if gc is None else gc.view(w + 1, -1, d).sum(-1).t().to(coef.dtype)
        t = lambda a: None if a is None else a.transpose(1, 2)  # noqa: E731
        return t(grads["x"]), gc, t(grads["p"]), None, None


def _coef_grad(gv, xv, pv, allowed, w, buf):
    """Σ over batch, targets i and channels of g_i · x_{i−j} (masked by `allowed`) as [w + 1, H·D] column
    sums. gv, xv: [B, N, H, D] views; buf: a [B, N, H, D] contiguous scratch of g's dtype.

    Products g_i · x_{i−j} land in token row i of the scratch, viewed as a [B·N, H·D] matrix; a weight per row
    (zero for i < j, where the row holds the previous lag's leftovers, and across a reset) then reduces the
    rows in one matrix-vector product. Column sums are cheap where a reduction over (B, N, D) keeping H is
    not. Sums run in at least float32: they add up B·N·D terms.
    """
    b, n, h, d = xv.shape
    o = 0 if pv is None else pv.shape[1]
    acc = torch.promote_types(gv.dtype, torch.float32)
    if buf.dtype != acc:  # half precision: products and sums in float32
        gv, xv, buf = gv.to(acc), xv.to(acc), torch.empty(buf.shape, dtype=acc, device=buf.device)
    flat = buf.view(b * n, h * d)
    torch.mul(gv, xv, out=buf)
    cols = [flat.sum(0)]
    pos = torch.arange(n, device=xv.device)
    for j in range(1, w + 1):
        col = flat.new_zeros(h * d)
        if n > j:
            ok = (pos >= j).expand(b, n)
            if allowed is not None:
                ok = ok & allowed[j - 1]
            torch.mul(gv[:, j:], xv[:, : n - j], out=buf[:, j:])
            col += ok.reshape(-1).to(acc) @ flat
        for rows, which, srows in _lag_spans(n, o, j):
            if which == "p":  # decoding only: a few rows against the kept tail
                col += (_masked(gv[:, rows].to(acc), allowed, j, rows) * pv[:, srows].to(acc)).sum((0, 1)).flatten()
        cols.append(col)
    return torch.stack(cols)
