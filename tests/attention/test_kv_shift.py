"""KV shifting: the definition, its parameters, and its integration in the LM (causality, cache, documents)."""

import pytest
import torch

from attnlab.attention import AttentionSpec, build_transform, kernels
from attnlab.attention.kv_shift import KVShift, KVShiftConfig, _ShiftFn, lag_allowed
from attnlab.errors import UserError
from attnlab.models.lm import LM, LMConfig


def naive_shift(x, coef, reset=None, prev=None):
    """Σ_j coef[h, j]·x[b, h, i − j], by loops; a lag is dropped if it crosses a reset or runs off the start."""
    b, h, n, d = x.shape
    w = coef.shape[1] - 1
    out = torch.zeros_like(x)
    for bi in range(b):
        for i in range(n):
            for j in range(w + 1):
                if reset is not None and any(bool(reset[bi, t]) for t in range(max(i - j + 1, 0), i + 1)):
                    continue
                src = i - j
                if src >= 0:
                    val = x[bi, :, src]
                elif prev is not None:
                    val = prev[bi, :, w + src]
                else:
                    continue
                out[bi, :, i] += coef[:, j, None] * val
    return out


# Options that make approximate kernels approximate at the few tokens of these tests.
SHORT_OPTIONS = {"ssa": {"factor": 2}, "hyper": {"min_seq_len": 8, "block_size": 8, "sample_size": 4}}


def tiny_lm(window=1, shift="kv", kernel="exact", n_kv_head=2, seed=0, constraint="none"):
    torch.manual_seed(seed)
    spec = AttentionSpec(name=kernel, options=SHORT_OPTIONS.get(kernel, {}), transform="kv_shift",
                         transform_options={"window": window, "shift": shift, "constraint": constraint})
    cfg = LMConfig(vocab_size=32, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=32, max_seq_len=64, attention=spec)
    return LM(cfg).double().eval()


def shifts(model):
    return [m for m in model.modules() if isinstance(m, KVShift)]


@pytest.mark.parametrize("window", [1, 2, 3])
def test_transform_matches_the_definition(window):
    torch.manual_seed(window)
    t = KVShift(KVShiftConfig(window=window), n_kv_head=3, head_dim=4).double()
    k, v = torch.randn(2, 2, 3, 9, 4, dtype=torch.float64)
    reset = torch.rand(2, 9) < 0.25
    coef = t.coefficients()
    for rs in (None, reset):
        k2, v2, state = t(k, v, reset=rs)
        torch.testing.assert_close(k2, naive_shift(k, coef["alpha"], rs), rtol=0, atol=1e-12)
        torch.testing.assert_close(v2, naive_shift(v, coef["beta"], rs), rtol=0, atol=1e-12)
    # With a carried state, the first tokens mix with the state instead of zeros (unless a reset blocks it).
    prev = torch.randn(2, 3, window, 4, dtype=torch.float64)
    k2, _, _ = t(k, v, reset=reset, state={"k": prev, "v": prev})
    torch.testing.assert_close(k2, naive_shift(k, coef["alpha"], reset, prev), rtol=0, atol=1e-12)


def test_initialisation_follows_the_paper():
    torch.manual_seed(0)
    t = KVShift(KVShiftConfig(), n_kv_head=64, head_dim=8)
    for name in ("alpha", "beta"):
        c = t.coefficients()[name]
        assert c.shape == (64, 2)
        assert bool(((c[:, 0] > 0) & (c[:, 0] < 1)).all())
        torch.testing.assert_close(c.sum(dim=1), torch.ones(64))
        # U(0, 1): 64 draws spread over the interval, not a constant.
        assert c[:, 0].min() < 0.2 and c[:, 0].max() > 0.8
    assert not torch.equal(t.alpha, t.beta)
    wide = KVShift(KVShiftConfig(window=3), n_kv_head=5, head_dim=8).coefficients()["alpha"]
    assert wide.shape == (5, 4) and bool((wide > 0).all())
    torch.testing.assert_close(wide.sum(dim=1), torch.ones(5))


def test_constraints_start_equal_and_bound_the_coefficients():
    for mode in ("none", "sigmoid", "clamp"):
        torch.manual_seed(1)
        c = KVShift(KVShiftConfig(constraint=mode), n_kv_head=4, head_dim=8).coefficients()["alpha"]
        torch.testing.assert_close(c.sum(dim=1), torch.ones(4), atol=1e-3, rtol=0)
    far = torch.tensor([[-3.0, 4.0]] * 4)
    got = {}
    for mode in ("none", "sigmoid", "clamp"):
        t = KVShift(KVShiftConfig(constraint=mode), n_kv_head=4, head_dim=8)
        with torch.no_grad():
            t.alpha.copy_(far)
        got[mode] = t.coefficients()["alpha"]
    assert got["none"].min() == -3.0  # unconstrained, as in the paper: weights may go negative
    assert bool(((got["sigmoid"] > 0) & (got["sigmoid"] < 1)).all())
    assert got["clamp"].min() == 0.0 and got["clamp"].max() == 1.0


def test_shift_options_select_keys_or_values():
    k, v = torch.randn(2, 1, 2, 6, 4)
    only_k = KVShift(KVShiftConfig(shift="k"), n_kv_head=2, head_dim=4)
    k2, v2, state = only_k(k, v)
    assert torch.equal(v2, v) and not torch.allclose(k2, k) and set(state) == {"k"}
    assert [n for n, _ in only_k.named_parameters()] == ["alpha"]
    only_v = KVShift(KVShiftConfig(shift="v"), n_kv_head=2, head_dim=4)
    k2, v2, state = only_v(k, v)
    assert torch.equal(k2, k) and not torch.allclose(v2, v) and set(state) == {"v"}


def test_grouped_query_attention_has_four_scalars_per_kv_head():
    model = tiny_lm(n_kv_head=2)
    for t in shifts(model):
        assert sum(p.numel() for p in t.parameters()) == 4 * 2
        assert t.alpha.shape == (2, 2) and t.beta.shape == (2, 2)
    vanilla = LM(LMConfig(vocab_size=32, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64))
    assert model.num_params() - vanilla.num_params() == 2 * 4 * 2


def test_bad_options_are_user_errors():
    with pytest.raises(UserError):
        build_transform("kv_shift", {"window": 0}, n_kv_head=2, head_dim=4)
    with pytest.raises(UserError):
        build_transform("kv_shift", {"shift": "q"}, n_kv_head=2, head_dim=4)
    with pytest.raises(UserError):
        build_transform("kv_shift", {"gate": True}, n_kv_head=2, head_dim=4)
    with pytest.raises(UserError, match="window"):
        KVShiftConfig(window=-1)  # the config itself refuses it, however it was made


def test_the_transform_keeps_the_head_shape_it_was_built_for():
    t = build_transform("kv_shift", {"window": 2}, n_kv_head=3, head_dim=4)
    assert (t.n_kv_head, t.head_dim) == (3, 4)
    assert t.coefficients()["alpha"].shape == (3, 3)


def test_gradients_are_correct():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 6, 3, dtype=torch.float64, requires_grad=True)
    prev = torch.randn(2, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    coef = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    allowed = lag_allowed(torch.tensor([[False, False, True, False, False, False]] * 2), 2)
    torch.autograd.gradcheck(lambda x, c, p: _ShiftFn.apply(x, c, p, allowed, 2), (x, coef, prev))
    torch.autograd.gradcheck(lambda x, c: _ShiftFn.apply(x, c, None, None, 2), (x, coef))
    # As in the model: a [B, H, N, D] view of [B, N, H, D] projections, three sequences, resets in one of them.
    proj = torch.randn(3, 5, 2, 3, dtype=torch.float64).transpose(1, 2).requires_grad_(True)
    resets = lag_allowed(torch.tensor([[False] * 5, [False, False, True, False, False], [False] * 5]), 2)
    for w, allowed in ((1, None), (2, None), (2, resets)):
        torch.autograd.gradcheck(lambda x, c: _ShiftFn.apply(x, c, None, allowed, w), (proj, coef[:, : w + 1]))
    short = x[:, :, :1].detach().requires_grad_(True)  # a decoding call shorter than the window
    torch.autograd.gradcheck(lambda x, c, p: _ShiftFn.apply(x, c, p, None, 2), (short, coef, prev))
    # Through the module and its constraint, the gradient reaches the raw parameters.
    t = KVShift(KVShiftConfig(constraint="sigmoid"), n_kv_head=2, head_dim=3)
    t(x.float(), x.float())[0].sum().backward()
    assert t.alpha.grad is not None and t.alpha.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_gradients_against_the_definition_in_the_models_memory_order(dtype, tol):
    # In the model the projections are laid out [B, N, H, D] while the kernel's gradient arrives laid out
    # [B, H, N, D]; gradcheck feeds gradients in the output's own order, so this order is checked here.
    torch.manual_seed(0)
    reset = torch.tensor([[False] * 7, [False, False, True, False, False, False, False], [False] * 7])
    g = torch.randn(3, 2, 7, 4).to(dtype)
    for window, rs in ((1, None), (2, None), (2, reset)):
        proj = torch.randn(3, 7, 2, 4).to(dtype).requires_grad_(True)
        coef = torch.randn(2, window + 1).to(dtype).requires_grad_(True)
        allowed = None if rs is None else lag_allowed(rs, window)
        _ShiftFn.apply(proj.transpose(1, 2), coef, None, allowed, window).backward(g)
        # The definition, in float64 on the same (rounded) inputs.
        ref_proj = proj.detach().double().requires_grad_(True)
        ref_coef = coef.detach().double().requires_grad_(True)
        naive_shift(ref_proj.transpose(1, 2), ref_coef, rs).backward(g.double())
        for got, want in ((proj.grad, ref_proj.grad), (coef.grad, ref_coef.grad)):
            assert got.dtype == dtype
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("window", [1, 3])
def test_changing_a_token_changes_no_earlier_output(window):
    model = tiny_lm(window=window)
    idx = torch.randint(0, 32, (2, 16))
    base = model(idx)
    t = 9
    idx2 = idx.clone()
    idx2[:, t] = (idx2[:, t] + 1) % 32
    out = model(idx2)
    torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-12)
    assert (out[:, t:] - base[:, t:]).abs().amax() > 1e-4


@pytest.mark.parametrize("window,shift", [(1, "kv"), (2, "kv"), (3, "k"), (1, "v")])
def test_cached_decoding_equals_the_full_forward(window, shift):
    model = tiny_lm(window=window, shift=shift)
    idx = torch.randint(0, 32, (2, 20))
    full = model(idx)
    cache = model.new_cache()
    outs, pos = [], 0
    for step in (5, 1, 1, 3, 1, 2, 1, 6):  # single tokens and chunks, some shorter than the window
        outs.append(model(idx[:, pos:pos + step], cache=cache))
        pos += step
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("window", [1, 2])
def test_cache_keeps_the_raw_unshifted_projections(window):
    model = tiny_lm(window=window)
    raw = {}
    for i, block in enumerate(model.blocks):
        block.attn.k_proj.register_forward_hook(lambda m, a, out, i=i: raw.__setitem__(("k", i), out))
        block.attn.v_proj.register_forward_hook(lambda m, a, out, i=i: raw.__setitem__(("v", i), out))
    cache = model.new_cache()
    model(torch.randint(0, 32, (2, 7)), cache=cache)
    for i, block in enumerate(model.blocks):
        for name in ("k", "v"):
            proj = block.attn._heads(raw[(name, i)], block.attn.n_kv_head)
            torch.testing.assert_close(cache[i].state[name], proj[:, :, -window:], rtol=0, atol=0)


def test_packed_documents_do_not_leak():
    model = tiny_lm(window=2)
    a, b = torch.randint(0, 32, (1, 6)), torch.randint(0, 32, (1, 9))
    doc_ids = torch.tensor([[0] * 6 + [1] * 9])
    packed = model(torch.cat([a, b], dim=1), doc_ids=doc_ids)
    alone = model(b)
    # Rotary is relative, so the second document reads exactly as if it stood alone.
    torch.testing.assert_close(packed[:, 6:], alone, rtol=0, atol=1e-10)
    other = model(torch.cat([(a + 5) % 32, b], dim=1), doc_ids=doc_ids)
    torch.testing.assert_close(other[:, 6:], packed[:, 6:], rtol=0, atol=1e-10)


def test_padding_does_not_leak():
    model = tiny_lm(window=2)
    seq = torch.randint(0, 32, (1, 10))
    alone = model(seq)
    for pad_token in (0, 7):
        idx = torch.cat([torch.full((1, 3), pad_token), seq], dim=1)
        valid = torch.tensor([[False] * 3 + [True] * 10])
        out = model(idx, valid=valid)
        torch.testing.assert_close(out[:, 3:], alone, rtol=0, atol=1e-10)


def test_cached_decoding_with_left_padding_equals_the_full_forward():
    model = tiny_lm(window=2)
    idx = torch.randint(0, 32, (2, 12))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :5] = False  # the first real token ends the prefill: the kept tail holds padding
    full = model(idx, valid=valid)
    cache = model.new_cache()
    outs = [model(idx[:, :6], valid=valid[:, :6], cache=cache)]
    for p in range(6, 12):
        outs.append(model(idx[:, p:p + 1], valid=valid[:, p:p + 1], cache=cache))
    got = torch.cat(outs, dim=1)
    torch.testing.assert_close(got[valid], full[valid], rtol=0, atol=1e-10)


def test_composes_with_every_causal_kernel():
    names = [n for n, e in kernels().items() if e.caps.causal]
    assert "exact" in names
    for name in names:
        model = tiny_lm(kernel=name).train()
        attn = model.blocks[0].attn
        seen = {}
        attn.k_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("raw_k", out))
        attn.v_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("raw_v", out))
        attn.kernel.register_forward_pre_hook(lambda m, a: seen.__setitem__("kernel_in", a), with_kwargs=False)
        idx = torch.randint(0, 32, (2, 24))
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        # The kernel receives rotary(shift(projection)) for keys and shift(projection) for values.
        k, v, _ = attn.transform(attn._heads(seen["raw_k"], 2), attn._heads(seen["raw_v"], 2))
        pos = torch.arange(23)
        torch.testing.assert_close(seen["kernel_in"][1], attn.rotary(k, pos), msg=name)
        torch.testing.assert_close(seen["kernel_in"][2], v, msg=name)
        for t in shifts(model):
            for p in (t.alpha, t.beta):
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        if not kernels()[name].caps.stochastic:
            model.eval()
            with torch.no_grad():
                base = model(idx)
                idx2 = idx.clone()
                idx2[:, 15] = (idx2[:, 15] + 1) % 32
                torch.testing.assert_close(model(idx2)[:, :15], base[:, :15], rtol=0, atol=1e-10, msg=name)
