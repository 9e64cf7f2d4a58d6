"""exact_attention (SDPA) against the float64 reference, forward and backward."""

import pytest
import torch

from attnlab.attention import exact_attention, reference_attention
from attnlab.attention.masks import causal_mask


def _qkv(b=2, hq=4, hkv=4, nq=7, nk=7, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    return q, k, v


def _padding(b, nk, seed=1):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(b, nk, generator=g) > 0.3
    valid[:, 0] = True  # keep every row non-empty; empty rows have their own test
    return valid[:, None, None, :]


def _full_mask(b, h, nq, nk, seed=2):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, h, nq, nk, generator=g) > 0.4
    m[..., 0] = True
    return m


CASES = {
    "causal": dict(kw=dict(causal=True)),
    "noncausal": dict(kw=dict(causal=False)),
    "key_padding": dict(kw=dict(causal=False), mask=lambda b, h, nq, nk: _padding(b, nk)),
    "key_padding_causal": dict(kw=dict(causal=True), mask=lambda b, h, nq, nk: _padding(b, nk)),
    "full_mask": dict(kw=dict(causal=False), mask=lambda b, h, nq, nk: _full_mask(b, h, nq, nk)),
    "gqa_causal": dict(kw=dict(causal=True), shape=dict(hq=4, hkv=2)),
    "gqa_mask": dict(kw=dict(causal=False), shape=dict(hq=4, hkv=2), mask=lambda b, h, nq, nk: _full_mask(b, h, nq, nk)),
    # Cached decoding: the queries are the newest positions, so causal aligns bottom-right.
    "decode_causal": dict(kw=dict(causal=True), shape=dict(nq=3, nk=9)),
    "decode_one_gqa": dict(kw=dict(causal=True), shape=dict(hq=4, hkv=2, nq=1, nk=9)),
    "scale": dict(kw=dict(causal=True, scale=0.37)),
}


def _case(name):
    c = CASES[name]
    shape = dict(b=2, hq=4, hkv=4, nq=7, nk=7, d=8) | c.get("shape", {})
    q, k, v = _qkv(**shape)
    mask = c["mask"](shape["b"], shape["hq"], shape["nq"], shape["nk"]) if "mask" in c else None
    return q, k, v, dict(c["kw"], mask=mask)


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_backward_and_lse_match_reference(name):
    q, k, v, kw = _case(name)
    g = torch.Generator().manual_seed(3)
    w_out = torch.randn(q.shape, generator=g)
    w_lse = torch.randn(q.shape[:3], generator=g)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = exact_attention(*leaves, return_lse=True, **kw)
    assert out.dtype == torch.float32 and out.shape == q.shape and lse.shape == q.shape[:3]
    ((out * w_out).sum() + (lse * w_lse).sum()).backward()

    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    rq, rk, rv = ref_leaves
    # reference_attention casts its output back to the input dtype: float64 in, float64 out.
    ref_out, ref_lse = reference_attention(rq, rk, rv, return_lse=True, **kw)
    ((ref_out * w_out.double()).sum() + (ref_lse * w_lse.double()).sum()).backward()

    torch.testing.assert_close(out.double(), ref_out.detach(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=2e-5, rtol=1e-4)
    for got, ref, what in zip(leaves, ref_leaves, "qkv"):
        assert got.grad.shape == got.shape, what
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=5e-5, rtol=1e-4, msg=f"grad of {what}")


def test_output_is_the_same_with_and_without_lse():
    q, k, v, kw = _case("gqa_causal")
    out = exact_attention(q, k, v, **kw)
    out2, _ = exact_attention(q, k, v, return_lse=True, **kw)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, out2)


def test_causal_flag_equals_explicit_bottom_right_mask():
    q, k, v = _qkv(nq=3, nk=8)
    a = exact_attention(q, k, v, causal=True)
    b = exact_attention(q, k, v, mask=causal_mask(3, 8))
    torch.testing.assert_close(a, b)
    # The last query sees every key; the first sees all but the last two.
    full = exact_attention(q[:, :, -1:], k, v)
    torch.testing.assert_close(a[:, :, -1:], full)
    first = exact_attention(q[:, :, :1], k[:, :, :6], v[:, :, :6])
    torch.testing.assert_close(a[:, :, :1], first)


def test_gradcheck_float64():
    q, k, v = _qkv(b=1, hq=2, hkv=1, nq=3, nk=4, d=4, dtype=torch.float64)
    mask = torch.tensor([True, True, False, True])[None, None, None, :]
    args = tuple(t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        out, lse = exact_attention(q, k, v, causal=True, mask=mask, return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("gqa", [False, True])
def test_fully_masked_row_is_zero_and_gradients_are_finite(gqa):
    q, k, v = _qkv(b=2, hq=4, hkv=2 if gqa else 4, nq=5, nk=5)
    mask = _full_mask(2, 4, 5, 5)
    mask[0, 1, 2] = False  # batch 0, head 1, query 2 sees nothing
    mask[1, :, 4] = False  # batch 1, query 4 sees nothing in any head
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = exact_attention(*leaves, mask=mask, return_lse=True)
    assert torch.isfinite(out).all()
    assert (out[0, 1, 2] == 0).all() and (out[1, :, 4] == 0).all()
    assert lse[0, 1, 2] == float("-inf") and (lse[1, :, 4] == float("-inf")).all()
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    (out.square().sum() + finite_lse.sum()).backward()
    for t, what in zip(leaves, "qkv"):
        assert torch.isfinite(t.grad).all(), f"NaN/inf in grad of {what}"
    assert (leaves[0].grad[0, 1, 2] == 0).all(), "an empty row cannot depend on its query"

    ref = reference_attention(q, k, v, mask=mask)
    torch.testing.assert_close(out.detach(), ref, atol=2e-5, rtol=1e-4)


def test_causal_with_more_queries_than_keys_leaves_the_oldest_queries_empty():
    # Bottom-right alignment: with 5 queries over 3 keys the first two queries precede every key.
    q, k, v = _qkv(nq=5, nk=3)
    out = exact_attention(q, k, v, causal=True)
    assert torch.isfinite(out).all()
    assert (out[:, :, :2] == 0).all()
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=True), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["auto", "math", "flash"])
@pytest.mark.parametrize("name", ["noncausal", "causal", "key_padding"])
def test_a_chosen_sdpa_backend_matches_the_reference(backend, name):
    from attnlab.attention import build_kernel

    q, k, v, kw = _case(name)
    kernel = build_kernel("exact", {"sdpa_backend": backend})
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = kernel(q, k, v, **kw)
    want = reference_attention(*(t.detach().double().requires_grad_() for t in (q, k, v)), **kw)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_an_unknown_sdpa_backend_is_a_one_line_user_error():
    from attnlab.attention import build_kernel
    from attnlab.errors import UserError

    with pytest.raises(UserError, match="sdpa_backend must be auto or one of math"):
        build_kernel("exact", {"sdpa_backend": "fastest"})
