"""MultiHeadAttention: cached decoding, rotary positions, grouped-query shapes, cross-attention."""

import pytest
import torch

from attnlab.attention import LayerCache, MultiHeadAttention, build_kernel, reference_attention
from attnlab.attention.positions import Rotary


def _layer(d=32, h=4, hkv=None, rotary=True, seed=0, **kw):
    torch.manual_seed(seed)
    head_dim = d // h
    return MultiHeadAttention(d, h, build_kernel("exact"), n_kv_head=hkv, rotary=Rotary(head_dim) if rotary else None,
                              **kw).eval()


def _x(b=2, n=9, d=32, seed=1):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hkv", [None, 2, 1])
@pytest.mark.parametrize("rotary", [True, False])
def test_cached_token_by_token_equals_full_forward(hkv, rotary):
    layer = _layer(hkv=hkv, rotary=rotary)
    x = _x()
    n = x.shape[1]
    full = layer(x, causal=True, positions=torch.arange(n))
    cache = LayerCache()
    # A prefill of 3 tokens, then one at a time: both code paths of the cache are exercised.
    steps = [layer(x[:, :3], causal=True, positions=torch.arange(3), cache=cache)]
    for t in range(3, n):
        steps.append(layer(x[:, t:t + 1], causal=True, positions=torch.tensor([t]), cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.length == n
    assert cache.k.shape == (2, hkv or 4, n, 8)


def test_cached_decoding_keeps_key_padding():
    layer = _layer()
    x = _x(n=7)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :2] = False  # row 1 is left-padded
    full = layer(x, causal=True, positions=torch.arange(7), valid=valid)
    cache = LayerCache()
    outs = [layer(x[:, :4], causal=True, positions=torch.arange(4), valid=valid[:, :4], cache=cache)]
    for t in range(4, 7):
        outs.append(layer(x[:, t:t + 1], causal=True, positions=torch.tensor([t]), cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1)[:, 2:], full[:, 2:], atol=1e-5, rtol=1e-4)
    assert cache.valid.shape == (2, 7) and not cache.valid[1, :2].any() and cache.valid[:, 2:].all()


def test_layer_matches_hand_written_attention_with_gqa():
    layer = _layer(hkv=2, rotary=False)
    x = _x(n=5)
    y = layer(x, causal=True)
    b, n, _ = x.shape
    q = layer.q_proj(x).view(b, n, 4, 8).transpose(1, 2)
    k = layer.k_proj(x).view(b, n, 2, 8).transpose(1, 2)
    v = layer.v_proj(x).view(b, n, 2, 8).transpose(1, 2)
    # Head h uses key/value head h // 2: grouped heads are consecutive.
    o = reference_attention(q, k, v, causal=True)
    want = layer.o_proj(o.transpose(1, 2).reshape(b, n, 32))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-4)


def test_gqa_shapes():
    layer = _layer(d=32, h=4, hkv=2)
    assert layer.q_proj.out_features == 32 and layer.k_proj.out_features == 16 and layer.v_proj.out_features == 16
    assert layer.o_proj.in_features == 32
    x = _x(n=6)
    cache = LayerCache()
    y = layer(x, causal=True, positions=torch.arange(6), cache=cache)
    assert y.shape == x.shape
    assert cache.k.shape == cache.v.shape == (2, 2, 6, 8)
    with pytest.raises(ValueError):
        MultiHeadAttention(32, 4, build_kernel("exact"), n_kv_head=3)


def test_rotary_scores_depend_only_on_position_difference():
    rot = Rotary(16)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)

    def score(m, n):
        return (rot(q, torch.tensor([m])) * rot(k, torch.tensor([n]))).sum().item()

    for m, n in [(5, 2), (9, 9), (0, 7)]:
        for shift in (1, 13, 100):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    # ...and do depend on the difference, otherwise the test above would hold for no rotation at all.
    assert abs(score(5, 2) - score(5, 3)) > 1e-3
    # A rotation keeps norms, and position 0 is the identity.
    torch.testing.assert_close(rot(q, torch.tensor([0])), q)
    torch.testing.assert_close(rot(q, torch.tensor([37])).norm(), q.norm())


def test_rotary_batched_positions_equal_per_row_positions():
    rot = Rotary(8)
    x = torch.randn(2, 3, 4, 8, generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    both = rot(x, pos)
    torch.testing.assert_close(both[0], rot(x[:1], pos[0])[0])
    torch.testing.assert_close(both[1], rot(x[1:], pos[1])[0])


def test_layer_is_translation_invariant_with_rotary():
    # Relative positions: shifting every position by the same amount leaves a rotary layer's output unchanged.
    layer = _layer()
    x = _x(n=6)
    torch.testing.assert_close(layer(x, causal=True, positions=torch.arange(6)),
                               layer(x, causal=True, positions=torch.arange(6) + 40), atol=1e-5, rtol=1e-4)


def test_cross_attention_cache_equals_no_cache():
    layer = _layer(rotary=False, d_context=24)
    ctx = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(3))
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    x = _x(n=4)
    full = layer(x, context=ctx, valid=valid)
    cache = LayerCache()
    steps = [layer(x[:, t:t + 1], context=ctx, valid=valid, cache=cache) for t in range(4)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    # The padded context keys are invisible: changing them changes nothing.
    ctx2 = ctx.clone()
    ctx2[1, 3:] = 100.0
    torch.testing.assert_close(layer(x, context=ctx2, valid=valid), full)
