"""Pathway pruning against float64 references written out loop by loop."""

import math

import pytest
import torch

from attnlab.attention import build_kernel, kernels, reference_attention
from attnlab.attention.masks import combine
from attnlab.attention.prune import PruneConfig, keep_mask, pruned_attention
from attnlab.errors import UserError


def _qkv(b=2, hq=4, hkv=4, nq=9, nk=9, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
            for h, n in ((hq, nq), (hkv, nk), (hkv, nk))]


def _mask(b, h, nq, nk, seed=3):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, h, nq, nk, generator=g) > 0.4
    m[..., -1] = True
    return m


def _loop_reference(q, k, v, kept):
    """out[b,h,i] = Σ_{j kept} exp(s_ij) v_j / Σ_{j kept} exp(s_ij), one row at a time in float64."""
    out = torch.zeros_like(q)
    scale = 1 / math.sqrt(q.shape[-1])
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                js = kept[b, h, i].nonzero().flatten().tolist()
                if not js:
                    continue
                w = torch.tensor([math.exp(float(q[b, h, i] @ k[b, h, j]) * scale) for j in js], dtype=torch.float64)
                w = w / w.sum()
                out[b, h, i] = sum(wj * v[b, h, j] for wj, j in zip(w, js))
    return out


def _visible(b, h, nq, nk, causal, mask):
    m = combine(mask, causal, nq, nk)
    return torch.ones(b, h, nq, nk, dtype=torch.bool) if m is None else m.expand(b, h, nq, nk)


@pytest.mark.parametrize("method", ["topk", "topp", "random"])
@pytest.mark.parametrize("causal,masked,nq", [(True, False, 9), (False, True, 9), (True, True, 4)])
def test_keep_one_is_exact_attention(method, causal, masked, nq):
    q, k, v = _qkv(nq=nq)
    mask = _mask(2, 4, nq, 9) if masked else None
    got = pruned_attention(q, k, v, PruneConfig(method=method, keep=1.0), causal=causal, mask=mask)
    want = reference_attention(q, k, v, causal=causal, mask=mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal,masked", [(True, False), (False, True), (True, True)])
def test_top_k_keeps_exactly_k_highest_visible_connections(causal, masked):
    q, k, v = _qkv()
    mask = _mask(2, 4, 9, 9) if masked else None
    cfg = PruneConfig(method="topk", top_k=3)
    out = pruned_attention(q, k, v, cfg, causal=causal, mask=mask)
    vis = _visible(2, 4, 9, 9, causal, mask)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    kept = torch.zeros_like(vis)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in vis.shape[:3]]).tolist():
        b, h, i = idx
        js = vis[b, h, i].nonzero().flatten().tolist()
        best = sorted(js, key=lambda j: -float(s[b, h, i, j]))[:3]
        kept[b, h, i, best] = True
    assert (kept.sum(-1) == vis.sum(-1).clamp(max=3)).all()
    torch.testing.assert_close(out, _loop_reference(q, k, v, kept), rtol=0, atol=1e-12)


def test_fraction_rounds_up_and_keeps_at_least_one():
    q, k, v = _qkv()
    vis = _visible(2, 4, 9, 9, True, None)
    s = ((q @ k.transpose(-1, -2)) / math.sqrt(8)).masked_fill(~vis, float("-inf"))
    for keep in (0.01, 0.3, 0.5):
        kept = keep_mask(s, vis, PruneConfig(keep=keep))
        want = torch.ceil(vis.sum(-1) * keep).clamp(min=1)
        assert torch.equal(kept.sum(-1), want.long())
        assert not (kept & ~vis).any()


def test_random_keeps_the_count_uniformly_and_reproducibly():
    q, k, v = _qkv(b=1, hq=1, hkv=1, nq=6, nk=6)
    vis = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    vis[..., 1] = False
    s = (q @ k.transpose(-1, -2)).masked_fill(~vis, float("-inf"))
    counts = torch.zeros(6)
    trials = 2000
    for seed in range(trials):
        kept = keep_mask(s, vis, PruneConfig(method="random", keep=0.4, seed=seed))
        assert (kept.sum(-1) == 2).all() and not (kept & ~vis).any()
        counts += kept[0, 0].sum(0).double().float()
    # Each of the 5 visible keys is kept with probability 2/5 in each of the 6 rows.
    freq = counts / (trials * 6)
    assert freq[1] == 0
    expected, sd = 0.4, math.sqrt(0.4 * 0.6 / (trials * 6))
    assert ((freq[[0, 2, 3, 4, 5]] - expected).abs() < 5 * sd).all()
    a = keep_mask(s, vis, PruneConfig(method="random", keep=0.4, seed=7))
    assert torch.equal(a, keep_mask(s, vis, PruneConfig(method="random", keep=0.4, seed=7)))


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    q, k, v = _qkv(b=1, hq=2, hkv=2, nq=7, nk=7)
    vis = _visible(1, 2, 7, 7, True, None)
    s = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, -1)
    kept = keep_mask(s, vis, PruneConfig(method="topp", keep=0.7))
    for h in range(2):
        for i in range(7):
            probs = sorted(((float(p[0, h, i, j]), j) for j in range(i + 1)), reverse=True)
            mass, want = 0.0, set()
            for pj, j in probs:
                want.add(j)
                mass += pj
                if mass >= 0.7:
                    break
            assert set(kept[0, h, i].nonzero().flatten().tolist()) == want


def test_pruning_is_causal_grouped_and_differentiable():
    q, k, v = _qkv(hq=4, hkv=2)
    for x in (q, k, v):
        x.requires_grad_(True)
    out = pruned_attention(q, k, v, PruneConfig(keep=0.3), causal=True)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    k2 = k.detach().clone()
    k2[:, :, 5] += 1.0
    with torch.no_grad():
        out2 = pruned_attention(q.detach(), k2, v.detach(), PruneConfig(keep=0.3), causal=True)
    torch.testing.assert_close(out2[:, :, :5], out.detach()[:, :, :5], rtol=0, atol=0)


def test_empty_rows_give_zeros_and_minus_inf_lse():
    q, k, v = _qkv(b=1, nq=3, nk=3)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    mask[..., 1, :] = False
    out, lse = pruned_attention(q, k, v, PruneConfig(keep=0.5), mask=mask, return_lse=True)
    assert (out[:, :, 1] == 0).all() and torch.isneginf(lse[:, :, 1]).all()
    assert torch.isfinite(lse[:, :, [0, 2]]).all()


def test_registered_with_a_description_that_says_dense_cost_and_checks_options():
    entry = kernels()["prune"]
    assert "analysis, dense cost" in entry.description
    kern = build_kernel("prune", {"method": "random", "keep": 0.2, "seed": 3}, need={"causal": True})
    q, k, v = [x.float() for x in _qkv()]
    assert kern(q, k, v, causal=True).shape == q.shape
    for bad in ({"keep": 0.0}, {"keep": 1.5}, {"top_k": -1}, {"method": "topp", "top_k": 2}, {"method": "x"}):
        with pytest.raises(UserError):
            build_kernel("prune", bad)


@pytest.mark.parametrize("method", ["topk", "topp"])
def test_query_chunks_change_nothing_but_memory(method):
    q, k, v = _qkv(nq=5, nk=9)
    mask = _mask(2, 4, 5, 9)
    cfg = PruneConfig(method=method, keep=0.4)
    whole = pruned_attention(q, k, v, cfg, causal=True, mask=mask, return_lse=True)
    parts = pruned_attention(q, k, v, cfg, causal=True, mask=mask, return_lse=True, chunk_elems=2 * 4 * 9 * 2)
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    kept = pruned_attention(q, k, v, PruneConfig(method="random", keep=0.4), causal=True, chunk_elems=72)
    assert torch.isfinite(kept).all()
