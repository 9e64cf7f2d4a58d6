"""SSA's gathered attention on torch's fused CPU flash kernel, with no dense mask (the CPU path of ssa/kernel.py).

Queries keep their original order and each window's gathered keys are sorted by original position, so
causality is a staircase. A block of queries at positions [P0, P1) sees every gathered key before P0 with no
mask at all, and among the keys in [P0, P1) those not after the query: a small [rows × rows/S] mask. Each
block therefore makes one maskless flash call over its past keys and one masked call over its diagonal keys;
the two and the query's own key (the self slot, q_i·k_i with value v_i) are merged through their
log-sum-exps and written in place into one output buffer laid out as the projections are.

Backward runs the kernel's backward per part with the merged output and log-sum-exp, as ring attention does:
the kernel recomputes each part's probabilities from the merged lse, so they come out already weighted by the
merge, and D = rowsum(dO ∘ O) from the merged output, which together are exactly the merged attention's
gradient. Nothing of size [N × N/S] is kept for backward: the saved tensors are q, k, v, the output and its
lse; each window's keys are gathered again in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# Query rows per causal block: smaller blocks waste fewer masked scores on the diagonal (about rows/2 per
# query) but make more kernel calls.
BLOCK_ROWS = 256


def supported(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and _FLASH is not None and _FLASH_BWD is not None and q.dtype in _DTYPES


@dataclass(frozen=True)
class Block:
    """Query rows (= positions) [r0, r1); the window's gathered keys [0, c0) are all before r0 for every
    example (no mask), keys [c0, c1) need the causal mask, keys from c1 on are after r1 - 1 for every example."""

    r0: int
    r1: int
    c0: int
    c1: int


@dataclass(frozen=True)
class Window:
    """Queries [r0, r1) attend to the keys in columns [k0, k1) of the draw (real keys only), split in blocks."""

    r0: int
    r1: int
    k0: int
    k1: int
    blocks: tuple[Block, ...]


def plan(keys: torch.Tensor, windows: list[tuple[int, int, int, int]], causal: bool,
         block_rows: int | None = None) -> tuple[Window, ...]:
    """Cut each window (r0, r1, k0, k1) into query blocks. keys: [B, K] original positions, sorted within
    each window. The key counts are the min / max over the batch, so one call serves every example: a key
    that is past for one example and diagonal for another goes to the masked part, where the mask still
    compares its own position."""
    block_rows = block_rows or BLOCK_ROWS
    out = []
    for r0, r1, k0, k1 in windows:
        if not causal:
            out.append(Window(r0, r1, k0, k1, (Block(r0, r1, k1 - k0, k1 - k0),)))
            continue
        t = max(1, round((r1 - r0) / block_rows))
        bounds = [r0 + round(i * (r1 - r0) / t) for i in range(t + 1)]
        win = keys[:, k0:k1].contiguous()
        edges = torch.tensor(bounds, dtype=win.dtype, device=win.device).expand(win.shape[0], -1).contiguous()
        counts = torch.searchsorted(win, edges)  # keys strictly before each bound: [B, t + 1]
        c0, c1 = counts[:, :-1].amin(0).tolist(), counts[:, 1:].amax(0).tolist()
        blocks = tuple(Block(a, e, lo, hi) for a, e, lo, hi in zip(bounds, bounds[1:], c0, c1))
        out.append(Window(r0, r1, k0, k1, blocks))
    return tuple(out)


def gathered_attention(q, k, v, keys, open_, windows: tuple[Window, ...], scale: float):
    """Attention of each query over its window's gathered keys (causal as planned) plus its own key where
    `open_` [B, N] says so. q: [B, Hq, N, D]; k, v: [B, Hkv, N, D]; keys: [B, K] original positions.
    Returns (out [B, Hq, N, D], lse [B, Hq, N]); lse carries no gradient."""
    return _Gathered.apply(q, k, v, keys, open_, windows, scale)


def _wide(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gather(t, keys, win):
    """[B, Hkv, K_w, D] view of the window's keys of t ([B, Hkv, N, D]), rows laid out [B, K_w, Hkv, D]."""
    bidx = torch.arange(t.shape[0], device=t.device)[:, None]
    return t.transpose(1, 2)[bidx, keys[:, win.k0:win.k1]].transpose(1, 2)


def _diag_bias(kpos, blk, dtype):
    """Additive mask [B, 1, rows, c1 - c0] (0 or -inf) and the rows it hides entirely [B, 1, rows]."""
    qpos = torch.arange(blk.r0, blk.r1, device=kpos.device)
    hide = kpos[:, None, None, blk.c0:blk.c1] > qpos[:, None]
    bias = torch.zeros(hide.shape, dtype=dtype, device=kpos.device).masked_fill_(hide, float("-inf"))
    return bias, hide.all(-1)


def _grouped(t, hkv):
    """[B, Hq, R, ...] -> [B, Hkv, G, R, ...]: query heads grouped by the key/value head they share."""
    return t.unflatten(1, (hkv, t.shape[1] // hkv))


class _Work:
    """Scratch for one block's elementwise work, reused across blocks, so that the products and sums of the
    merge and of the self slot allocate nothing of a block's size (and the output and gradient buffers are
    written in place where the dtype allows)."""

    def __init__(self, q, rows, wide):
        b, hq, _, d = q.shape
        self.wide = wide
        self.same = q.dtype == wide
        self.buf = torch.empty(b, hq, rows, d, dtype=wide, device=q.device)
        self.acc = None if self.same else torch.empty_like(self.buf)

    def rowdot(self, a, b):
        """(a · b) summed over the last dim, [B, H, R], where a [B, H, R, D] and b broadcasts to it."""
        ws = self.buf[:, : a.shape[1], : a.shape[2]]
        if self.same:
            torch.mul(a, b, out=ws)
        else:
            ws.copy_(a).mul_(b)
        return ws.sum(-1)

    def accumulator(self, target):
        """Where a block's result is summed: the target itself when it has the working precision."""
        return target if self.same else self.acc[:, :, : target.shape[2]]


def _rowdots(qb, kb, work, scale):
    """scale · a_i·b_i for a with Hq heads and b with Hkv (grouped heads share b_i): [B, Hq, R], in the
    working precision. With q and k: the self slot's scores; with dO and v: dO_i·v_i."""
    hkv = kb.shape[1]
    g = qb.shape[1] // hkv
    if g == 1:
        return work.rowdot(qb, kb).mul_(scale)
    qg = _grouped(qb, hkv)
    return torch.stack([work.rowdot(qg[:, :, i], kb) for i in range(g)], 2).flatten(1, 2).mul_(scale)


def _per_group(dst, src, w, hkv, value=1.0):
    """dst[:, h_kv] += value · Σ_g w[:, (h_kv, g), :, None] · src[:, (h_kv, g)] for grouped-query heads, or the
    reverse (dst has Hq heads, src Hkv): whichever side has more heads is indexed by group. No temporaries
    beyond the weights."""
    g = w.shape[1] // hkv
    if g == 1:
        dst.addcmul_(src, w.unsqueeze(-1).to(dst.dtype), value=value)
        return
    wg = _grouped(w, hkv)
    for i in range(g):
        d = _grouped(dst, hkv)[:, :, i] if dst.shape[1] != hkv else dst
        s = _grouped(src, hkv)[:, :, i] if src.shape[1] != hkv else src
        d.addcmul_(s, wg[:, :, i].unsqueeze(-1).to(dst.dtype), value=value)


def _scatter_add(dk, dv, idx, grads):
    """Add a part's key/value gradients ([B, Hkv, K, D]) to the rows of dk, dv its keys came from."""
    dk.transpose(1, 2).index_put_(idx, grads[1].transpose(1, 2), accumulate=True)
    dv.transpose(1, 2).index_put_(idx, grads[2].transpose(1, 2), accumulate=True)


class _Gathered(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, keys, open_, windows, scale):
        b, hq, n, d = q.shape
        hkv = k.shape[1]
        wide = _wide(q.dtype)
        out = q.new_empty(b, n, hq, d).transpose(1, 2)
        lse = torch.empty(b, hq, n, dtype=wide, device=q.device)
        work = _Work(q, max(blk.r1 - blk.r0 for win in windows for blk in win.blocks), wide)
        for win in windows:
            kg, vg = _gather(k, keys, win), _gather(v, keys, win)
            kpos = keys[:, win.k0:win.k1]
            for blk in win.blocks:
                rows = slice(blk.r0, blk.r1)
                qb = q[:, :, rows]
                parts = []
                if blk.c0 > 0:
                    o, l = _FLASH(qb, kg[:, :, :blk.c0], vg[:, :, :blk.c0], 0.0, False, scale=scale)
                    parts.append((o, l.to(wide)))
                if blk.c1 > blk.c0:
                    bias, empty = _diag_bias(kpos, blk, q.dtype)
                    o, l = _FLASH(qb, kg[:, :, blk.c0:blk.c1], vg[:, :, blk.c0:blk.c1], 0.0, False,
                                  attn_mask=bias, scale=scale)
                    # The kernel gives o = 0 but lse = 0 on a row whose keys are all hidden.
                    parts.append((o, l.to(wide).masked_fill_(empty, float("-inf"))))
                ls = _rowdots(qb, k[:, :, rows], work, scale).masked_fill_(~open_[:, None, rows], float("-inf"))
                big = torch.stack([ls] + [l for _, l in parts]).logsumexp(0)
                ob = out[:, :, rows]
                acc = work.accumulator(ob)
                # Every row has a part (its own key is in the self slot or drawn), so acc is fully written.
                first = True
                for o, l in parts:
                    w = torch.exp(l - big).unsqueeze(-1)
                    if first:
                        torch.mul(o, w, out=acc)
                        first = False
                    else:
                        acc.addcmul_(o, w)
                if first:
                    acc.zero_()
                _per_group(acc, v[:, :, rows], torch.exp(ls - big), hkv)
                if acc is not ob:
                    ob.copy_(acc)
                lse[:, :, rows] = big
        ctx.save_for_backward(q, k, v, keys, open_, out, lse)
        ctx.windows, ctx.scale = windows, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, keys, open_, out, lse = ctx.saved_tensors
        windows, scale = ctx.windows, ctx.scale
        b, hq, n, d = q.shape
        hkv = k.shape[1]
        wide = _wide(q.dtype)
        if 0 in dout.stride():
            dout = dout.contiguous()  # e.g. the expanded gradient of a sum
        work = _Work(q, max(blk.r1 - blk.r0 for win in windows for blk in win.blocks), wide)
        dq = q.new_empty(b, n, hq, d).transpose(1, 2)
        # Key/value gradients start as the self slot's and gather the sampled keys' per window.
        dk = k.new_zeros(b, n, hkv, d).transpose(1, 2)
        dv = v.new_zeros(b, n, hkv, d).transpose(1, 2)
        bidx = torch.arange(b, device=q.device)[:, None]
        for win in windows:
            kg, vg = _gather(k, keys, win), _gather(v, keys, win)
            kpos = keys[:, win.k0:win.k1]
            for blk in win.blocks:
                rows = slice(blk.r0, blk.r1)
                qb, dob, ob, lb = q[:, :, rows], dout[:, :, rows], out[:, :, rows], lse[:, :, rows]
                kb, vb = k[:, :, rows], v[:, :, rows]
                # The self slot by hand: P_ii, D_i = dO_i·O_i, dS_ii = P_ii (dO_i·v_i - D_i).
                p = torch.exp(_rowdots(qb, kb, work, scale).sub_(lb)).masked_fill_(~open_[:, None, rows], 0.0)
                ds = _rowdots(dob, vb, work, 1.0).sub_(work.rowdot(dob, ob)).mul_(p)
                dqb = dq[:, :, rows]
                acc = work.accumulator(dqb)
                acc.zero_()
                _per_group(acc, kb, ds, hkv, value=scale)
                _per_group(dk[:, :, rows], qb, ds, hkv, value=scale)
                _per_group(dv[:, :, rows], dob, p, hkv)
                if blk.c0 > 0:
                    g = _FLASH_BWD(dob, qb, kg[:, :, :blk.c0], vg[:, :, :blk.c0], ob, lb, 0.0, False, scale=scale)
                    acc += g[0]
                    _scatter_add(dk, dv, (bidx, kpos[:, :blk.c0]), g)
                if blk.c1 > blk.c0:
                    bias, _ = _diag_bias(kpos, blk, q.dtype)
                    g = _FLASH_BWD(dob, qb, kg[:, :, blk.c0:blk.c1], vg[:, :, blk.c0:blk.c1], ob, lb, 0.0, False,
                                   attn_mask=bias, scale=scale)
                    acc += g[0]
                    _scatter_add(dk, dv, (bidx, kpos[:, blk.c0:blk.c1]), g)
                if acc is not dqb:
                    dqb.copy_(acc)
        return dq, dk, dv, None, None, None, None
