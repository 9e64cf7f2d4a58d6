"""Merging partial attentions through their log-sum-exp equals attention over the union of keys."""

import torch

from attnlab.attention import exact_attention, merge, merge_many, reference_attention


def _qkv(b=2, h=2, nq=5, nk=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, nq, d, generator=g), torch.randn(b, h, nk, d, generator=g),
            torch.randn(b, h, nk, d, generator=g))


def _part(q, k, v, keys: torch.Tensor, **kw):
    """Attention of q over the keys where `keys` [Nk] is True, as (out, lse)."""
    return exact_attention(q, k, v, mask=keys[None, None, None, :], return_lse=True, **kw)


def test_two_disjoint_parts_merge_to_the_union():
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(1)
    a = torch.rand(k.shape[2], generator=g) < 0.5
    assert a.any() and not a.all()
    # An interleaved split, not a contiguous one: merge must not care how the keys are arranged.
    o1, l1 = _part(q, k, v, a)
    o2, l2 = _part(q, k, v, ~a)
    o, lse = merge(o1, l1, o2, l2)
    ref, ref_lse = reference_attention(q, k, v, return_lse=True)
    torch.testing.assert_close(o.double(), ref.double(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-4)


def test_merge_under_causal_mask_and_gradients_match_reference():
    q, k, v = _qkv(nq=6, nk=6)
    split = torch.arange(6) % 3 == 0
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    # Query 0 sees only key 0, so the part without key 0 is empty for it: a realistic -inf part.
    o1, l1 = _part(*leaves, split, causal=True)
    o2, l2 = _part(*leaves, ~split, causal=True)
    assert torch.isinf(l2[:, :, 0]).all()
    o, lse = merge_many([(o1, l1), (o2, l2)])
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(2))
    ((o * w).sum() + lse.sum()).backward()

    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = reference_attention(*ref_leaves, causal=True, return_lse=True)
    ((ref * w.double()).sum() + ref_lse.sum()).backward()
    torch.testing.assert_close(o.double(), ref.detach(), atol=2e-5, rtol=1e-4)
    for got, want, what in zip(leaves, ref_leaves, "qkv"):
        assert torch.isfinite(got.grad).all(), what
        torch.testing.assert_close(got.grad.double(), want.grad, atol=5e-5, rtol=1e-4, msg=f"grad of {what}")


def test_many_parts_in_any_order():
    q, k, v = _qkv(nk=15)
    owner = torch.arange(15) % 4  # four parts, one of which may be small
    parts = [_part(q, k, v, owner == i) for i in (2, 0, 3, 1)]
    o, lse = merge_many(parts)
    ref, ref_lse = reference_attention(q, k, v, return_lse=True)
    torch.testing.assert_close(o.double(), ref.double(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-4)


def test_empty_part_is_ignored_without_nan():
    q, k, v = _qkv()
    o1, l1 = exact_attention(q, k, v, return_lse=True)
    empty_o = torch.zeros_like(o1)  # what a kernel returns for rows with no visible key
    empty_lse = torch.full_like(l1, float("-inf"))
    for o, lse in (merge(o1, l1, empty_o, empty_lse), merge(empty_o, empty_lse, o1, l1)):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, o1)
        torch.testing.assert_close(lse, l1)


def test_rows_empty_in_both_parts_give_zeros_and_minus_inf():
    g = torch.Generator().manual_seed(3)
    o1, o2 = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    l1, l2 = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    l1[0, 1] = l2[0, 1] = float("-inf")
    o1[0, 1] = o2[0, 1] = 0.0
    out, lse = merge(o1, l1, o2, l2)
    assert torch.isfinite(out).all()
    assert (out[0, 1] == 0).all() and lse[0, 1] == float("-inf")
    assert torch.isfinite(lse[1]).all()


def test_merge_keeps_dtype_and_weights_in_float32():
    q, k, v = _qkv(nk=64)
    a = torch.arange(64) < 60  # a big and a tiny part: the tiny one's weight must survive bf16 outputs
    o1, l1 = _part(q, k, v, a)
    o2, l2 = _part(q, k, v, ~a)
    o, _ = merge(o1.bfloat16(), l1, o2.bfloat16(), l2)
    assert o.dtype == torch.bfloat16
    ref = reference_attention(q, k, v)
    torch.testing.assert_close(o.double(), ref.double(), atol=2e-2, rtol=2e-2)
