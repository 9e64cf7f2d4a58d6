"""topkeys: exact attention over the keys a pre-scoring method keeps, against float64 references."""

import math

import numpy as np
import pytest
import torch

from attnlab.attention import build_kernel
from attnlab.attention.topkeys import METHODS, choose, key_weights
from attnlab.errors import UserError


def _qkv(b=2, hq=4, hkv=2, n=23, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv)]


def _reference(q, k, v, keep, scale):
    """Softmax attention of every query over the kept keys of its (batch, kv head), one row at a time."""
    b, hq, n, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            idx = keep[bi][h // group]
            for i in range(n):
                s = torch.tensor([float(q[bi, h, i] @ k[bi, h // group, j]) * scale for j in idx], dtype=torch.float64)
                p = torch.softmax(s, 0)
                out[bi, h, i] = sum(p[t] * v[bi, h // group, j] for t, j in enumerate(idx))
    return out


def _top_by(scores_fn, k, budget):
    return [[sorted(np.argsort(-scores_fn(k[bi, h].numpy()), kind="stable")[:budget].tolist())
             for h in range(k.shape[1])] for bi in range(k.shape[0])]


def _leverage_np(m):
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    u = u[:, s > 1e-10 * s[0]]
    return (u ** 2).sum(1)


@pytest.mark.parametrize("method,score", [("leverage", _leverage_np), ("norm", lambda m: (m ** 2).sum(1))])
def test_top_scored_keys_match_an_svd_reference(method, score):
    q, k, v = _qkv()
    budget, scale = 7, 0.3
    kern = build_kernel("topkeys", {"method": method, "budget": budget})
    keep = _top_by(score, k, budget)
    assert kern.select(k).tolist() == keep
    torch.testing.assert_close(kern(q, k, v, scale=scale), _reference(q, k, v, keep, scale), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["kmeans", "kmedian", "random"])
def test_sampled_methods_attend_exactly_over_what_they_drew(method):
    q, k, v = _qkv(seed=1)
    kern = build_kernel("topkeys", {"method": method, "budget": 5, "seed": 3})
    keep = kern.select(k)
    assert keep.shape == (2, 2, 5) and all(len(set(r)) == 5 for row in keep.tolist() for r in row)
    assert torch.equal(keep, kern.select(k))  # a seed makes the draw repeatable
    out, lse = kern(q, k, v, scale=None, return_lse=True)
    scale = 1 / math.sqrt(8)
    torch.testing.assert_close(out, _reference(q, k, v, keep.tolist(), scale), rtol=1e-10, atol=1e-10)
    ks = k.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, 8)).repeat_interleave(2, dim=1)
    torch.testing.assert_close(lse, torch.logsumexp(q @ ks.mT * scale, -1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_a_budget_of_every_key_is_exact_attention(method):
    q, k, v = _qkv(n=12)
    out = build_kernel("topkeys", {"method": method, "budget": 12})(q, k, v)
    ref = torch.softmax(q @ k.repeat_interleave(2, 1).mT / math.sqrt(8), -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_kmeans_distances_are_to_the_planted_cluster_means():
    # Three tight, far-apart groups: Lloyd converges to the groups' means, and a key's weight is its distance
    # to its own group's mean.
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]], dtype=torch.float64)
    groups = torch.arange(30) % 3
    x = centres[groups] + 0.3 * torch.randn(30, 3, generator=g, dtype=torch.float64)
    means = torch.stack([x[groups == c].mean(0) for c in range(3)])
    want = (x - means[groups]).norm(dim=1)
    got = key_weights(x[None, None], "kmeans", clusters=3, iters=10, generator=torch.Generator().manual_seed(1))
    # float32 through |x|² - 2x·c + |c|²: a few 1e-5 of cancellation at |x|² ≈ 100.
    torch.testing.assert_close(got[0, 0].double(), want, rtol=1e-3, atol=1e-3)


def test_sampling_draws_without_replacement_in_proportion_to_the_weights():
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0], dtype=torch.float64)
    p = w / w.sum()
    g = torch.Generator().manual_seed(5)
    trials = 20000
    one = choose(w.expand(trials, 5), 1, sample=True, generator=g)[:, 0]
    freq = torch.bincount(one, minlength=5).double() / trials
    assert freq[4] == 0
    assert (freq - p).abs().max() < 4 * math.sqrt(0.25 / trials)
    # Two draws: P(i kept) = p_i + Σ_{j≠i} p_j p_i / (1 - p_j), the law of drawing one key at a time.
    two = choose(w.expand(trials, 5), 2, sample=True, generator=g)
    kept = torch.zeros(5, dtype=torch.float64)
    for i in range(5):
        kept[i] = (two == i).any(1).double().mean()
    want = torch.tensor([float(p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(5) if j != i)) for i in range(5)])
    assert (kept - want.double()).abs().max() < 4 * math.sqrt(0.25 / trials)


def test_gradients_reach_queries_keys_and_values():
    q, k, v = (t.float().requires_grad_() for t in _qkv())
    out = build_kernel("topkeys", {"method": "kmeans", "budget": 6})(q, k, v)
    out.square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_causal_use_and_bad_options_are_refused():
    with pytest.raises(UserError, match="lacks causal"):
        build_kernel("topkeys", {}, need={"causal": True})
    with pytest.raises(UserError, match="budget"):
        build_kernel("topkeys", {"budget": 0})
    with pytest.raises(UserError, match="method"):
        build_kernel("topkeys", {"method": "pca"})
    q, k, v = _qkv()
    with pytest.raises(UserError, match="causal"):
        build_kernel("topkeys", {"budget": 4})(q, k, v, causal=True)
