"""SSA kernel: exactness on its own draw, sampling statistics, causality, gradients, padding, modes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnlab.attention import build_kernel, exact_attention, reference_attention, set_attention_mode
from attnlab.attention.ssa import SSAAttention, SSAConfig, seed_sampling
from attnlab.attention.ssa import flash as ssa_flash
from attnlab.attention.ssa import kernel as ssa_mod
from attnlab.errors import UserError
from attnlab.models.lm import LM, LMConfig


def make(factor=4, sampling="unbiased", spread=1.0, mode="sample"):
    k = build_kernel("ssa", {"factor": factor, "sampling": sampling, "spread": spread})
    k.set_mode(mode)
    return k


def qkv(b=2, h=4, hkv=None, n=16, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hkv = hkv or h
    return (torch.randn(b, h, n, d, generator=g, dtype=dtype), torch.randn(b, hkv, n, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, n, d, generator=g, dtype=dtype))


def union_mask(draw, n, causal, mask):
    """What the kernel claims to compute: the drawn connections plus each query's own key."""
    m = (draw.key_mask() | torch.eye(n, dtype=torch.bool))[:, None]
    if causal:
        m = m & torch.ones(n, n, dtype=torch.bool).tril()
    return m if mask is None else m & mask


def test_registered_with_sample_mode_and_capabilities():
    k = make()
    assert isinstance(k, SSAAttention) and "sample" in k.modes
    from attnlab.attention.registry import kernel_entry

    caps = kernel_entry("ssa").caps
    assert caps.stochastic and caps.causal and caps.noncausal and caps.mask


@pytest.mark.parametrize("sampling,causal,n,factor,hkv,maskkind", [
    ("unbiased", True, 16, 4, 4, None),
    ("unbiased", False, 13, 3, 2, "pad"),
    ("unbiased", True, 13, 4, 2, "doc"),
    ("unbiased", True, 530, 4, 2, "pad"),  # long enough for the causal query chunks
    ("unbiased", True, 1030, 8, 4, "doc"),
    ("local", True, 16, 4, 4, None),
    ("local", False, 13, 4, 4, None),
    ("local", True, 14, 3, 2, "pad"),
    ("local", False, 16, 2, 4, "doc"),
    ("local", True, 1030, 2, 2, "pad"),  # windows long enough for the causal query chunks
])
def test_equals_reference_on_its_own_draw(sampling, causal, n, factor, hkv, maskkind):
    q, k, v = qkv(b=3, hkv=hkv, n=n)
    mask = None
    if maskkind == "pad":
        valid = torch.rand(3, n, generator=torch.Generator().manual_seed(1)) > 0.4
        valid[:, 0] = True
        mask = valid[:, None, None, :]
    elif maskkind == "doc":
        doc = (torch.rand(3, n, generator=torch.Generator().manual_seed(2)) < 0.3).cumsum(1)
        mask = (doc[:, :, None] == doc[:, None, :])[:, None]
    ker = make(factor, sampling, spread=0.5)
    out, lse = ker(q, k, v, causal=causal, mask=mask, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, mask=union_mask(ker.last_draw, n, causal, mask), return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sampling,causal", list(itertools.product(["unbiased", "local"], [False, True])))
def test_factor_one_is_exact_attention(sampling, causal):
    q, k, v = qkv(n=12, dtype=torch.float32)
    out = make(1, sampling)(q, k, v, causal=causal)
    torch.testing.assert_close(out, exact_attention(q, k, v, causal=causal), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=causal), rtol=1e-5, atol=1e-5)


def test_attention_runs_over_gathered_keys_only(monkeypatch):
    """Compute falls by S only if the keys are gathered: SDPA must see ~N/S keys, not a masked N x N."""
    seen = []
    real = ssa_mod.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((tuple(q.shape), tuple(k.shape)))
        return real(q, k, v, **kw)

    monkeypatch.setattr(ssa_mod.F, "scaled_dot_product_attention", spy)
    q, k, v = qkv(b=2, n=64, dtype=torch.float32)
    everything = torch.ones(2, 1, 1, 64, dtype=torch.bool)  # a caller's mask: the SDPA path
    make(4, "unbiased")(q, k, v, causal=True, mask=everything)
    make(4, "local")(q, k, v, causal=True, mask=everything)
    (uq, uk), (lq, lk) = seen
    assert uq[2] == 64 and uk[2] == 64 // 4 + 1  # all queries, N/S keys + the self slot
    assert lq[0] == 2 * 4 and lq[2] == 16 and lk[2] == 16 + 1  # S windows of w queries and w keys


@pytest.mark.parametrize("sampling", ["unbiased", "local"])
def test_fused_cpu_path_gathers_and_masks_only_the_diagonal(monkeypatch, sampling):
    """Without a caller's mask, the CPU path calls the flash kernel over gathered keys only: the keys before
    a query block with no mask, and a mask only over the keys inside the block, far smaller than N x N/S."""
    calls = []
    real = ssa_flash._FLASH

    def spy(q, k, v, *args, attn_mask=None, **kw):
        calls.append((q.shape[2], k.shape[2], None if attn_mask is None else attn_mask[0].numel()))
        return real(q, k, v, *args, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(ssa_flash, "_FLASH", spy)
    monkeypatch.setattr(ssa_flash, "BLOCK_ROWS", 128)
    n, factor = 2048, 4
    m = n // factor
    ker = make(factor, sampling)
    seed_sampling(ker, 0)
    ker(*qkv(b=2, h=1, n=n, d=4, dtype=torch.float32), causal=True)
    assert all(rows <= 2 * 128 for rows, _, _ in calls)
    assert max(keys for _, keys, _ in calls) <= m  # N/S keys (unbiased) or one window of w = N/S (local)
    scores = sum(rows * keys for rows, keys, _ in calls)
    masked = sum(x for _, _, x in calls if x is not None)
    # Causality skips about half of the N x N/S gathered scores; the masks cover a sliver of them.
    assert scores < 0.65 * n * m, scores / (n * m)
    assert masked < 0.25 * n * m, masked / (n * m)


@pytest.mark.parametrize("sampling,causal,n,factor,hkv,block", [
    ("unbiased", True, 40, 4, 2, 8),  # several query blocks, grouped-query heads
    ("unbiased", True, 37, 3, 4, 5),
    ("unbiased", False, 21, 2, 2, 8),
    ("local", True, 40, 4, 2, 4),
    ("local", True, 37, 3, 4, 8),  # a padded last window
    ("local", False, 30, 4, 4, 8),
])
def test_fused_cpu_path_gradients_equal_reference(monkeypatch, sampling, causal, n, factor, hkv, block):
    monkeypatch.setattr(ssa_flash, "BLOCK_ROWS", block)
    q, k, v = (x.requires_grad_() for x in qkv(b=3, hkv=hkv, n=n))
    ker = make(factor, sampling, spread=0.5)
    out = ker(q, k, v, causal=causal)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = reference_attention(q, k, v, mask=union_mask(ker.last_draw, n, causal, None))
    want = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fused_cpu_path_gradcheck(monkeypatch):
    monkeypatch.setattr(ssa_flash, "BLOCK_ROWS", 3)
    q, k, v = (x.requires_grad_() for x in qkv(b=2, h=2, hkv=1, n=9, d=4))
    for sampling in ("unbiased", "local"):
        ker = make(3, sampling)

        def f(q, k, v):
            seed_sampling(ker, 3)
            return ker(q, k, v, causal=True)

        assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("sampling", ["unbiased", "local"])
def test_fused_cpu_path_in_bfloat16(monkeypatch, sampling):
    monkeypatch.setattr(ssa_flash, "BLOCK_ROWS", 16)
    q, k, v = qkv(n=64, hkv=2, dtype=torch.float32)
    qb, kb, vb = (x.to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    ker = make(4, sampling)
    out = ker(qb, kb, vb, causal=True)
    out.float().pow(2).sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (qb, kb, vb))
    ref = reference_attention(q64, k64, v64, mask=union_mask(ker.last_draw, 64, True, None))
    ref.pow(2).sum().backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=0.02, atol=0.02)
    for a, b in ((qb, q64), (kb, k64), (vb, v64)):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=0.05, atol=0.05)


def test_lse_with_gradients_is_differentiable():
    """An lse that autograd needs goes through the SDPA path, whose lse is differentiable."""
    q, k, v = (x.requires_grad_() for x in qkv(n=12))
    ker = make(3)
    out, lse = ker(q, k, v, causal=True, return_lse=True)
    got = torch.autograd.grad(lse.sum() + out.sum(), (q, k, v))
    ref, ref_lse = reference_attention(q, k, v, mask=union_mask(ker.last_draw, 12, True, None), return_lse=True)
    want = torch.autograd.grad(ref_lse.sum() + ref.sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_unbiased_includes_each_key_with_probability_one_over_s():
    b, n, factor = 3000, 12, 3
    ker = make(factor, "unbiased")
    torch.manual_seed(0)
    ker(*qkv(b=b, h=1, n=n, d=2, dtype=torch.float32))
    keys = ker.last_draw.keys
    assert keys.shape == (b, n // factor)
    assert bool((keys[:, 1:] > keys[:, :-1]).all())  # distinct, sorted
    counts = torch.zeros(n).index_add_(0, keys.flatten(), torch.ones(keys.numel()))
    p = 1 / factor
    sd = math.sqrt(b * p * (1 - p))
    assert float((counts - b * p).abs().max()) < 5 * sd, counts
    # Keys are drawn jointly without replacement, not each key independently: pairs co-occur as in
    # sampling without replacement, P(i and j) = M(M-1) / (N(N-1)).
    key_mask = ker.last_draw.key_mask()[:, 0]  # every query sees the same subset
    pair = (key_mask[:, 0] & key_mask[:, 1]).float().mean()
    m = n // factor
    assert abs(float(pair) - m * (m - 1) / (n * (n - 1))) < 5 * math.sqrt(0.1 * 0.9 / b)


def mean_distance(draw, n):
    m = draw.key_mask()
    i = torch.arange(n)
    dist = (i[:, None] - i[None, :]).abs().float()
    return float((dist * m).sum() / m.sum())


def test_local_sampling_keeps_keys_nearer():
    n, b = 64, 200
    q, k, v = qkv(b=b, h=1, n=n, d=2, dtype=torch.float32)
    torch.manual_seed(0)
    dists = {}
    for name, sampling, spread in [("unbiased", "unbiased", 1.0), ("tight", "local", 0.25),
                                   ("local", "local", 1.0), ("wide", "local", 8.0)]:
        ker = make(4, sampling, spread)
        ker(q, k, v)
        dists[name] = mean_distance(ker.last_draw, n)
    # Uniform pairs on 64 positions are ~21 apart; windows of 16 with little noise keep them within ~6.
    assert dists["tight"] < dists["local"] < dists["wide"] <= dists["unbiased"] * 1.05, dists
    assert dists["local"] < 0.6 * dists["unbiased"], dists


@pytest.mark.parametrize("sampling", ["unbiased", "local"])
def test_no_future_leakage(sampling):
    q, k, v = qkv(b=2, n=24, dtype=torch.float32)
    t = 10
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + 1:] += 5 * torch.randn_like(k2[:, :, t + 1:])
    v2[:, :, t + 1:] += 5 * torch.randn_like(v2[:, :, t + 1:])
    q2 = q.clone()
    q2[:, :, t + 1:] += 1.0
    ker = make(2, sampling, spread=2.0)
    seed_sampling(ker, 7)
    a = ker(q, k, v, causal=True)
    seed_sampling(ker, 7)
    b = ker(q2, k2, v2, causal=True)
    torch.testing.assert_close(a[:, :, : t + 1], b[:, :, : t + 1], rtol=0, atol=0)
    assert (a[:, :, t + 1:] - b[:, :, t + 1:]).abs().amax() > 1e-2  # the perturbation is visible later


@pytest.mark.parametrize("sampling", ["unbiased", "local"])
def test_gradients_reach_only_sampled_keys(sampling):
    n, i = 32, 20
    q, k, v = (x.requires_grad_() for x in qkv(b=2, n=n))
    ker = make(4, sampling)
    out = ker(q, k, v, causal=True)
    out[:, :, i].pow(2).sum().backward()
    seen = union_mask(ker.last_draw, n, True, None)[:, 0, i]  # [B, N]: sampled keys visible to i, and i
    assert bool(seen.any(dim=1).all()) and bool((~seen).any(dim=1).all())
    for grad in (k.grad, v.grad):
        reached = grad.abs().amax(dim=(1, 3)) > 0  # [B, N]
        assert torch.equal(reached, seen)
    assert torch.equal(q.grad.abs().amax(dim=(1, 3)) > 0, (torch.arange(n) == i).expand(2, n))


def test_gradcheck_on_a_fixed_draw():
    q, k, v = (x.requires_grad_() for x in qkv(b=1, h=2, hkv=1, n=6, d=4))
    mask = torch.tensor([True] * 5 + [False])[None, None, None, :]
    for sampling in ("unbiased", "local"):
        ker = make(2, sampling)

        def f(q, k, v):
            seed_sampling(ker, 3)
            return ker(q, k, v, causal=True, mask=mask)

        assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("sampling,causal", list(itertools.product(["unbiased", "local"], [False, True])))
def test_no_nan_with_heavy_padding(sampling, causal):
    b, n = 4, 20
    valid = torch.zeros(b, n, dtype=torch.bool)
    valid[0, :1] = True  # a single real token
    valid[1, :3] = True
    valid[2, 5:9] = True  # left padding
    valid[3] = True
    q, k, v = (x.requires_grad_() for x in qkv(b=b, n=n, dtype=torch.float32))
    mask = valid[:, None, None, :]
    ker = make(8, sampling)
    out = ker(q, k, v, causal=causal, mask=mask)
    assert bool(torch.isfinite(out).all())
    out.sum().backward()
    assert all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))
    # No padded key leaks into any output: gradients on padded keys and values are exactly zero.
    assert float(k.grad.abs().amax(dim=(1, 3))[~valid].max()) == 0.0
    assert float(v.grad.abs().amax(dim=(1, 3))[~valid].max()) == 0.0
    ref = reference_attention(q.detach(), k.detach(), v.detach(),
                              mask=union_mask(ker.last_draw, n, causal, mask))
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)


def test_modes_auto_dense_sample_and_decoding():
    q, k, v = qkv(n=16, dtype=torch.float32)
    exact = exact_attention(q, k, v, causal=True)
    ker = make(4, mode="auto")
    ker.eval()
    torch.testing.assert_close(ker(q, k, v, causal=True), exact)  # auto in eval: exact
    ker.train()
    assert (ker(q, k, v, causal=True) - exact).abs().max() > 1e-3  # auto in training: sampled
    ker.set_mode("dense")
    torch.testing.assert_close(ker(q, k, v, causal=True), exact)
    ker.set_mode("sample")
    ker.eval()
    assert (ker(q, k, v, causal=True) - exact).abs().max() > 1e-3
    # Decoding (fewer queries than keys) is exact even when sampling.
    torch.testing.assert_close(ker(q[:, :, -2:], k, v, causal=True), exact[:, :, -2:])
    with pytest.raises(UserError):
        ker.set_mode("ensemble")


def test_seeding_is_reproducible_and_layers_draw_independently():
    cfg = LMConfig(vocab_size=32, n_layer=2, n_head=2, d_model=16, max_seq_len=32)
    cfg.attention.name = "ssa"
    cfg.attention.options = {"factor": 4}
    model = LM(cfg)
    set_attention_mode(model, "sample")
    idx = torch.randint(0, 32, (2, 32))
    seed_sampling(model, 5)
    a = model(idx)
    draws = [b.attn.kernel.last_draw.keys for b in model.blocks]
    assert not torch.equal(draws[0], draws[1])
    seed_sampling(model, 5)
    torch.testing.assert_close(model(idx), a, rtol=0, atol=0)
    seed_sampling(model, None)
    torch.manual_seed(1)
    c = model(idx)
    torch.manual_seed(1)
    torch.testing.assert_close(model(idx), c, rtol=0, atol=0)
    set_attention_mode(model, "auto")
    model.eval()
    dense = model(idx)
    set_attention_mode(model, "dense")
    torch.testing.assert_close(model(idx), dense)


def test_lm_trains_with_ssa_and_bf16_runs():
    cfg = LMConfig(vocab_size=32, n_layer=2, n_head=2, n_kv_head=1, d_model=16, max_seq_len=40)
    cfg.attention.name = "ssa"
    cfg.attention.options = {"factor": 4, "sampling": "local"}
    model = LM(cfg)
    idx = torch.randint(0, 32, (2, 40))
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 30:] = False
    _, loss = model(idx[:, :-1], idx[:, 1:], valid=valid[:, :-1])
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    q, k, v = qkv(n=24, dtype=torch.bfloat16)
    out = make(4)(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("options", [{"factor": 0}, {"factor": 2.5}, {"spread": -1.0}, {"spread": float("inf")},
                                     {"sampling": "nearby"}, {"s": 2}])
def test_bad_options_are_user_errors(options):
    with pytest.raises(UserError):
        build_kernel("ssa", options)


def test_the_config_itself_refuses_impossible_values():
    # Checked where the config is made, so a config built in code is held to the same ranges as CLI options.
    with pytest.raises(UserError, match="factor"):
        SSAConfig(factor=0)
    with pytest.raises(UserError, match="spread"):
        SSAConfig(spread=float("nan"))
