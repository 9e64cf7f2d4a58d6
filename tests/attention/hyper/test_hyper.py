import math

import pytest
import torch

from attnlab.attention import AttentionSpec, build_kernel, merge, reference_attention
from attnlab.attention.hyper import HyperConfig, attention_lse, hyper_attention, lsh
from attnlab.attention.swap import attention_layers, swap_attention, swapped_attention
from attnlab.attention.merge import merge_
from attnlab.errors import UserError
from attnlab.models.lm import LM, LMConfig

METHODS = ["kmeans", "kmedian", "leverage", "norm"]


def _qkv(b=1, hq=2, hkv=2, nq=200, nk=None, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    nk = nq if nk is None else nk
    return (torch.randn(b, hq, nq, d, generator=g).to(dtype), torch.randn(b, hkv, nk, d, generator=g).to(dtype),
            torch.randn(b, hkv, nk, d, generator=g).to(dtype))


def _close(got, want, tol=2e-5):
    (o, lse), (ro, rlse) = got, want
    torch.testing.assert_close(o.double(), ro.double(), rtol=tol, atol=tol)
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse.double()[fin], rlse.double()[fin], rtol=tol, atol=tol)


# A configuration that approximates at these tiny lengths: blocks of 16, 16 samples, exact only below 32.
SMALL = dict(block_size=16, sample_size=16, min_seq_len=32, lsh_bits=4)


@pytest.mark.parametrize("causal", [False, True])
def test_below_min_seq_len_or_with_a_block_covering_n_it_is_exact(causal):
    q, k, v = _qkv(nq=150)
    want = reference_attention(q, k, v, causal=causal, return_lse=True)
    _close(hyper_attention(q, k, v, HyperConfig(min_seq_len=150), causal=causal), want)
    _close(hyper_attention(q, k, v, HyperConfig(min_seq_len=8, block_size=150), causal=causal), want)
    # ...and it does approximate otherwise (the two checks above can fail).
    o, _ = hyper_attention(q, k, v, HyperConfig(**SMALL), causal=causal)
    assert (o - want[0]).norm() > 1e-2 * want[0].norm()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [False, True])
def test_top_k_equal_to_all_keys_is_exact(method, causal):
    q, k, v = _qkv(hq=4, hkv=2, nq=180)
    valid = torch.ones(1, 180, dtype=torch.bool)
    valid[:, 150:] = False  # padding in the batch, on top of the block padding (180 is not a multiple of 16)
    mask = valid[:, None, None, :]
    cfg = HyperConfig(**SMALL, prescore=method, top_k=180, clusters=4)
    _close(hyper_attention(q, k, v, cfg, causal=causal, mask=mask),
           reference_attention(q, k, v, causal=causal, mask=mask, return_lse=True))


def test_general_masks_and_rectangular_shapes_are_honoured():
    q, k, v = _qkv(hq=2, hkv=1, nq=120, nk=200)
    docs = torch.arange(200) // 70
    mask = (docs[-120:, None] == docs[None, :])[None, None]
    cfg = HyperConfig(**SMALL, prescore="norm", top_k=200)
    for causal in (False, True):
        _close(hyper_attention(q, k, v, cfg, causal=causal, mask=mask),
               reference_attention(q, k, v, causal=causal, mask=mask, return_lse=True))
    # More queries than keys, causal, bottom-right: the first queries see nothing.
    q2, k2, v2 = _qkv(nq=90, nk=60)
    got = hyper_attention(q2, k2, v2, cfg, causal=True)
    _close(got, reference_attention(q2, k2, v2, causal=True, return_lse=True))
    assert float(got[0][:, :, :30].abs().max()) == 0.0


def test_lse_merge_of_two_key_subsets_equals_attention_over_their_union():
    q, k, v = _qkv(nq=40, nk=70, seed=3)
    perm = torch.randperm(70, generator=torch.Generator().manual_seed(0))
    a, b = perm[:25], perm[25:]
    mask = torch.rand(1, 1, 40, 70, generator=torch.Generator().manual_seed(1)) > 0.5
    mask[..., 5, :] = False  # a query that sees nothing at all
    mask[..., 6, a] = False  # and one that sees nothing in the first subset
    pa = attention_lse(q, k[:, :, a], v[:, :, a], scale=0.3, mask=mask[..., a])
    pb = attention_lse(q, k[:, :, b], v[:, :, b], scale=0.3, mask=mask[..., b])
    want = reference_attention(q, k, v, mask=mask, scale=0.3, return_lse=True)
    _close(merge(*pa, *pb), want)
    _close(merge_(pa[0].clone(), pa[1].clone(), *pb), want)


def test_fused_and_differentiable_exact_pieces_agree():
    q, k, v = _qkv(nq=33, nk=47, seed=4)
    mask = torch.rand(1, 2, 33, 47, generator=torch.Generator().manual_seed(2)) > 0.6
    mask[:, :, 0] = False
    fused = attention_lse(q, k, v, scale=0.4, mask=mask)
    qg = q.clone().requires_grad_(True)
    math_path = attention_lse(qg, k, v, scale=0.4, mask=mask)
    _close(fused, math_path)
    _close(attention_lse(q[:, :, :33], k[:, :, :33], v[:, :, :33], scale=0.4, causal=True),
           reference_attention(q[:, :, :33], k[:, :, :33], v[:, :, :33], scale=0.4, causal=True, return_lse=True))
    (math_path[0].sum() + math_path[1][torch.isfinite(math_path[1])].sum()).backward()
    assert torch.isfinite(qg.grad).all()


@pytest.mark.parametrize("prescore", ["none", "norm", "kmeans"])
def test_the_sampled_residual_is_unbiased(prescore):
    """exp(lse) and exp(lse)·o estimate Σ e^s and Σ e^s v. Over many seeds their mean must match the exact
    sums within the standard error (mean z² ≈ 1), and a 3 % bias must stand out (power of the same check)."""
    q, k, v = _qkv(nq=192, seed=5, dtype=torch.float64)
    q, k = 0.8 * q, 0.8 * k
    ro, rl = reference_attention(q, k, v, return_lse=True)
    nums, dens = [], []
    for seed in range(300):
        cfg = HyperConfig(block_size=32, sample_size=16, min_seq_len=8, lsh_bits=3, seed=seed, prescore=prescore,
                          top_k=16, clusters=4, iters=3)
        o, lse = hyper_attention(q, k, v, cfg)
        nums.append(lse.exp()[..., None] * o)
        dens.append(lse.exp())
    for draws, exact in ((nums, rl.exp()[..., None] * ro), (dens, rl.exp())):
        x = torch.stack(draws)
        se = x.std(0) / math.sqrt(x.shape[0])
        z2 = ((x.mean(0) - exact) / se).pow(2).mean()
        assert 0.4 < float(z2) < 2.0
    biased = ((torch.stack(dens).mean(0) - 1.03 * rl.exp()) / (torch.stack(dens).std(0) / math.sqrt(300))).pow(2).mean()
    assert float(biased) > 4.0


@pytest.mark.parametrize("prescore", ["none", "kmeans"])
def test_causal_mode_never_looks_ahead(prescore):
    q, k, v = (t.double().requires_grad_(True) for t in _qkv(nq=160, seed=6))
    cfg = HyperConfig(**SMALL, prescore=prescore, top_k=8, clusters=2)
    t = 70
    o, lse = hyper_attention(q, k, v, cfg, causal=True)
    (o[:, :, : t + 1].sum() + lse[:, :, : t + 1].sum()).backward()
    assert float(k.grad[:, :, t + 1 :].abs().max()) == 0.0 and float(v.grad[:, :, t + 1 :].abs().max()) == 0.0
    assert float(q.grad[:, :, t + 1 :].abs().max()) == 0.0
    assert float(k.grad[:, :, : t + 1].abs().max()) > 0.0
    # Changing the future (keys and values after t) leaves the past bit-for-bit alone.
    with torch.no_grad():
        k2, v2 = k.detach().clone(), v.detach().clone()
        k2[:, :, t + 1 :] = torch.randn_like(k2[:, :, t + 1 :])
        v2[:, :, t + 1 :] += 5
        o1, _ = hyper_attention(q.detach(), k.detach(), v.detach(), cfg, causal=True)
        o2, _ = hyper_attention(q.detach(), k2, v2, cfg, causal=True)
    assert torch.equal(o2[:, :, : t + 1], o1[:, :, : t + 1])
    assert not torch.equal(o2[:, :, t + 1 :], o1[:, :, t + 1 :])


def test_batch_elements_do_not_mix():
    q, k, v = (t.requires_grad_(True) for t in _qkv(b=2, nq=120, seed=7))
    o, _ = hyper_attention(q, k, v, HyperConfig(**SMALL))
    o[0].sum().backward()
    assert float(k.grad[1].abs().max()) == 0.0 and float(v.grad[1].abs().max()) == 0.0


def test_grouped_query_heads_share_keys_like_repeated_heads():
    # Without samples (and with a deterministic score) nothing random but the shared hyperplanes is drawn,
    # so sharing 2 kv heads among 4 query heads must equal repeating them.
    q, k, v = _qkv(hq=4, hkv=2, nq=150, seed=8)
    cfg = HyperConfig(**{**SMALL, "sample_size": 0}, prescore="leverage", top_k=8)
    shared = hyper_attention(q, k, v, cfg, causal=True)
    repeated = hyper_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), cfg, causal=True)
    _close(shared, repeated, tol=1e-5)


def test_block_padding_is_masked_while_zero_padding_adds_a_sink():
    # 100 keys in blocks of 16 leave 12 padding slots in the last block. With a residual that is the same in
    # both variants (deterministic norm pre-scoring, nothing sampled), exp(lse) of the zero-padded variant
    # exceeds the masked one by exactly 12·e^0 for queries of that block, 0 elsewhere.
    q, k, v = _qkv(nq=100, seed=9, dtype=torch.float64)
    cfg = dict(block_size=16, sample_size=0, min_seq_len=8, lsh_bits=4, prescore="norm", top_k=8)
    _, lse_m = hyper_attention(q, k, v, HyperConfig(**cfg))
    _, lse_z = hyper_attention(q, k, v, HyperConfig(**cfg, zero_pad=True))
    extra = (lse_z.exp() - lse_m.exp()).flatten()
    hit = extra > 0.5
    torch.testing.assert_close(extra[hit], torch.full_like(extra[hit], 12.0))
    assert float(extra[~hit].abs().max()) < 1e-9
    assert 0 < int(hit.sum()) < extra.numel()


@pytest.mark.parametrize("causal", [False, True])
def test_masked_padding_ignores_a_common_key_offset_while_zero_padding_does_not(causal, monkeypatch):
    # Exact attention ignores an offset u added to every key: row i's logits all move by q_i·u·scale. With
    # hyperplanes orthogonal to u the buckets do not move either (and the seeded samples never depend on the
    # keys), so masked hyper must return the same output with its lse moved by q_i·u·scale. Zero padding keys
    # stay at logit 0 while the real keys move: those rows change (here u lowers the real logits by ~2).
    monkeypatch.setattr(lsh, "projections", lambda dim, bits, *, generator, device: torch.eye(dim, bits, device=device))
    q, k, v = _qkv(nq=100, seed=13, dtype=torch.float64)  # 100 keys: padding in the last block of 16
    q[..., 7] += 1.5
    u = torch.zeros(8, dtype=torch.float64)
    u[7] = -4.0  # orthogonal to the 4 hyperplanes e_0..e_3
    shift = (q @ u) / math.sqrt(8)
    for zero_pad in (False, True):
        cfg = HyperConfig(**SMALL, zero_pad=zero_pad)
        o, lse = hyper_attention(q, k, v, cfg, causal=causal)
        o_u, lse_u = hyper_attention(q, k + u, v, cfg, causal=causal)
        if not zero_pad:
            torch.testing.assert_close(o_u, o, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(lse_u, lse + shift, rtol=1e-9, atol=1e-9)
        else:
            moved = (o_u - o).norm(dim=-1)
            assert float(moved.max()) > 0.1 and float((lse_u - lse - shift).abs().max()) > 0.5
            assert 0 < int((moved > 1e-9).sum()) < moved.numel()  # only rows whose block held padding


def test_bf16_runs_close_to_fp32():
    # Buckets, scores and samples are decided in float32 either way; only the attention arithmetic is bf16.
    q, k, v = (t.bfloat16() for t in _qkv(nq=300, seed=10))
    cfg = HyperConfig(**SMALL, prescore="kmeans", top_k=16)
    o32, lse32 = hyper_attention(q.float(), k.float(), v.float(), cfg, causal=True)
    o16, lse16 = hyper_attention(q, k, v, cfg, causal=True)
    assert o16.dtype == torch.bfloat16 and lse16.dtype == torch.float32
    assert float((o16.float() - o32).norm() / o32.norm()) < 2e-2
    assert float((lse16 - lse32).abs().max()) < 0.05


def test_gradients_match_finite_differences():
    q, k, v = (t.double().requires_grad_(True) for t in _qkv(hq=2, hkv=1, nq=40, d=4, seed=11))
    cfg = HyperConfig(block_size=8, sample_size=4, min_seq_len=10, lsh_bits=2, prescore="norm", top_k=4)
    for causal in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, c: hyper_attention(a, b, c, cfg, causal=causal), (q, k, v),
                                        fast_mode=True)


def test_seed_makes_calls_repeatable_and_none_draws_afresh():
    q, k, v = _qkv(nq=120, seed=12)
    a = hyper_attention(q, k, v, HyperConfig(**SMALL, seed=3))[0]
    assert torch.equal(a, hyper_attention(q, k, v, HyperConfig(**SMALL, seed=3))[0])
    assert not torch.equal(a, hyper_attention(q, k, v, HyperConfig(**SMALL, seed=4))[0])
    torch.manual_seed(0)
    b = hyper_attention(q, k, v, HyperConfig(**SMALL, seed=None))[0]
    assert not torch.equal(b, hyper_attention(q, k, v, HyperConfig(**SMALL, seed=None))[0])


@pytest.mark.parametrize("options, words", [
    ({"block_size": 0}, "block_size"),
    ({"prescore": "lev"}, "prescore"),
    ({"lsh_bits": 0}, "lsh_bits"),
    ({"lsh_bits": 17}, "lsh_bits"),
    ({"sample_size": -1}, "sample_size"),
    ({"sample_size": 0}, "sample_size must be at least 1 without pre-scoring"),
    ({"min_seq_len": 0}, "min_seq_len"),
    ({"prescore": "norm", "top_k": 0}, "top_k"),
    ({"top_k": -1}, "top_k"),
    ({"clusters": 0}, "clusters"),
    ({"iters": -1}, "iters"),
    ({"fit_size": 0}, "fit_size"),
    ({"block_size": 2.5}, "block_size"),
])
def test_config_is_checked(options, words):
    with pytest.raises(UserError, match=words) as e:
        build_kernel("hyper", options)
    assert "\n" not in str(e.value)


def test_config_accepts_what_it_can_run():
    # Pre-scored keys alone may fill the residual: nothing sampled, the top_k keys attended exactly.
    assert HyperConfig(sample_size=0, prescore="norm", top_k=8).sample_size == 0
    assert HyperConfig(top_k=64).n_clusters == 16 and HyperConfig(prescore="kmedian").n_iters == 3


def _lm(spec=AttentionSpec()):
    torch.manual_seed(0)
    return LM(LMConfig(n_layer=3, n_head=4, n_kv_head=2, d_model=32, max_seq_len=160, attention=spec)).eval()


def test_models_use_hyper_in_chosen_layers_and_swap_kernels_after_training():
    idx = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(0))
    exact = _lm()
    with torch.no_grad():
        want = exact(idx)
        # A threshold above the length: hyper is exact, so the swap must not change the logits.
        swapped = swap_attention(exact, "hyper", {"min_seq_len": 4096}, "last:2")
        assert [type(a.kernel).__name__ for a in attention_layers(exact)] == ["ExactAttention", "HyperAttention", "HyperAttention"]
        torch.testing.assert_close(exact(idx), want, rtol=1e-5, atol=1e-5)
        with swapped_attention(exact, "hyper", SMALL, "0"):
            approx = exact(idx)
        assert (approx - want).abs().max() > 1e-4
        torch.testing.assert_close(exact(idx), want, rtol=1e-5, atol=1e-5)  # restored
        assert len(swapped) == 2
        built = _lm(AttentionSpec(name="hyper", options=SMALL, layers="odd"))
        names = [type(a.kernel).__name__ for a in attention_layers(built)]
        assert names == ["ExactAttention", "HyperAttention", "ExactAttention"]
        assert torch.isfinite(built(idx)).all()
    with pytest.raises(UserError):
        swap_attention(exact, "hyper", {}, "first:9,x")
