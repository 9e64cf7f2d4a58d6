"""Exact attention that also returns the log-sum-exp cheaply: the exact pieces of HyperAttention."""

from __future__ import annotations

import torch

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CUDA_LSE_OK: dict[torch.dtype, bool] = {}


def attention_lse(q, k, v, *, scale: float, mask: torch.Tensor | None = None, causal: bool = False,
                  bias: torch.Tensor | None = None):
    """softmax(q kᵀ·scale + bias) v and its log-sum-exp for equal-shaped 4-D batches ([B, H, N, D]).

    mask: bool, True = attend; bias: float, added to the scores (-inf hides a key; log w weights it by w);
    both broadcastable to [B, H, Nq, Nk]. causal: top-left, square only. Rows with no visible key give o = 0
    and lse = -inf. lse is float32 (float64 for float64 input).
    Without gradients this is one fused SDPA kernel (CPU flash; CUDA memory-efficient attention once a
    self-check on this dtype passes, masks only); with gradients it is differentiable math.
    """
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError("attention_lse: causal needs as many queries as keys")
    if mask is not None:
        hide = mask_bias(mask, lse_dtype(q))
        bias = hide if bias is None else bias + hide
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not needs_grad:
        # A fused kernel that refuses these inputs (a dtype, a stride, a mask layout) raises before computing
        # anything; the math below gives the same result.
        try:
            if q.device.type == "cpu" and _CPU_FLASH is not None:
                return _cpu_flash(q, k, v, scale, bias, causal)
            # The CUDA kernel takes the bias in q's dtype: fine for 0/-inf, not for weights in bf16.
            masks_only = bias is None or bool(((bias == 0) | torch.isneginf(bias)).all())
            if q.device.type == "cuda" and masks_only and _cuda_lse_ok(q.dtype, q.device):
                return _cuda_efficient(q, k, v, scale, bias, causal)
        except RuntimeError:
            pass
    return _math_lse(q, k, v, scale, bias, causal)


def lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def mask_bias(mask, dtype):
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _fix_empty(o, lse, bias):
    """Fused kernels return lse = 0 for a row whose keys are all hidden; the merge needs -inf there."""
    if bias is None:
        return o, lse
    empty = torch.isneginf(bias).all(-1)
    if not bool(empty.any()):
        return o, lse
    empty = empty.expand(lse.shape)
    return o.masked_fill(empty.unsqueeze(-1), 0.0), lse.masked_fill(empty, float("-inf"))


def _cpu_flash(q, k, v, scale, bias, causal):
    o, lse = _CPU_FLASH(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
    return _fix_empty(o, lse.to(lse_dtype(q)), bias)


def _cuda_efficient(q, k, v, scale, bias, causal):
    full = None if bias is None else bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, full, True, 0.0, causal, scale=scale)
    return _fix_empty(out[0], out[1][..., : q.shape[2]].float(), bias)


def _cuda_lse_ok(dtype, device) -> bool:
    """Use the private CUDA kernel only after it matched the math on a small masked problem, once per dtype."""
    if dtype not in _CUDA_LSE_OK:
        ok = False
        try:
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(2, 3, n, 64, generator=g, device=device).to(dtype) for n in (40, 72, 72))
            mask = torch.rand(2, 1, 40, 72, generator=g, device=device) > 0.3
            bias = mask_bias(mask, torch.float32)
            o1, l1 = _cuda_efficient(q, k, v, 0.125, bias, False)
            o2, l2 = _math_lse(q, k, v, 0.125, bias, False)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            ok = bool((o1.float() - o2.float()).abs().max() < tol and (l1 - l2).abs().max() < tol)
        except (RuntimeError, TypeError, AttributeError):
            ok = False
        _CUDA_LSE_OK[dtype] = ok
    return _CUDA_LSE_OK[dtype]


def _math_lse(q, k, v, scale, bias, causal):
    s = torch.matmul(q, k.transpose(-1, -2)).to(lse_dtype(q)) * scale
    if bias is not None:
        s = s + bias
    if causal:
        tri = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~tri, float("-inf"))
    # A max-shift and a guarded log keep empty rows at lse = -inf with finite gradients (no inf - inf).
    top = s.amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(s - top)
    den = e.sum(-1)
    has = den > 0
    den_safe = torch.where(has, den, torch.ones_like(den))
    lse = torch.where(has, torch.log(den_safe) + top.squeeze(-1), torch.full_like(den, float("-inf")))
    o = torch.matmul((e / den_safe.unsqueeze(-1)).to(v.dtype), v)
    return o, lse
