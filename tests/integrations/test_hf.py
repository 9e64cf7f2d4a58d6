"""attnlab kernels patched into tiny random transformers models (Llama with grouped-query attention, GPT-2)."""

import pytest
import torch

# transformers is the optional extra attnlab[hf]; `make test` and CI install it, so it is imported, not skipped.
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from attnlab.attention import set_attention_mode
from attnlab.attention.masks import causal_mask
from attnlab.errors import UserError
from attnlab.integrations.hf import (
    attention_modules,
    kernel_mask,
    original_attention,
    patch_model,
    unpatch_model,
)

VOCAB = 61


def tiny_llama(layers=3, attn="sdpa", **kw):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **kw)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn).eval()


def tiny_gpt2(layers=3, attn="sdpa", **kw):
    torch.manual_seed(0)
    # Scaling by the inverse layer index gives each layer its own `scaling`: a patch that ignored the model's
    # scaling would show.
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=256,
                     scale_attn_by_inverse_layer_idx=True, bos_token_id=0, eos_token_id=0, **kw)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation=attn).eval()


def ids(b=2, n=24, seed=0):
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def padded(n=24):
    """Left padding in row 0, right padding in row 1."""
    am = torch.ones(2, n, dtype=torch.long)
    am[0, :5] = 0
    am[1, -7:] = 0
    return am


def attn_outputs(model, x, **kw):
    """Each attention module's output, by layer, from one forward pass."""
    seen, hooks = {}, []
    for idx, mods in attention_modules(model).items():
        hooks.append(mods[0].register_forward_hook(lambda m, a, out, idx=idx: seen.__setitem__(idx, out[0].detach())))
    try:
        with torch.no_grad():
            logits = model(x, use_cache=False, **kw).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, seen


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_exact_patch_equals_the_models_own_sdpa(build):
    model = build()
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
        assert patch_model(model, "exact", layers="all") == [0, 1, 2]
        out = model(x).logits
    assert model.config._attn_implementation == "attnlab"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_padded_batch_matches_hf_sdpa_on_real_tokens(build):
    model = build()
    x, am = ids(), padded()
    with torch.no_grad():
        ref = model(x, attention_mask=am).logits
        patch_model(model, "exact", layers="all")
        out = model(x, attention_mask=am).logits
        # Without the registered mask builder the mask would arrive as None: real tokens would see padding.
        unmasked = model(x).logits
    real = am.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[0][real[0]], ref[0][real[0]], atol=1e-3)


def test_eager_model_keeps_eager_in_unpatched_layers_and_takes_float_masks():
    model = tiny_llama(attn="eager")
    x, am = ids(), padded()
    ref_logits, ref = attn_outputs(model, x, attention_mask=am)
    patch_model(model, "exact", layers="last:1")
    assert model.config._attn_implementation == "attnlab_eager"
    logits, out = attn_outputs(model, x, attention_mask=am)
    real = am.bool()
    for i in (0, 1):
        assert torch.equal(out[i], ref[i])
    torch.testing.assert_close(out[2][real], ref[2][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[real], ref_logits[real], rtol=1e-5, atol=1e-5)


def test_unpatched_layers_stay_bit_identical_and_patched_ones_run_the_kernel():
    model = tiny_llama(layers=4)
    x, am = ids(n=32), padded(32)
    _, ref = attn_outputs(model, x, attention_mask=am)
    chosen = patch_model(model, "ssa", {"factor": 4}, layers="odd")
    assert chosen == [1, 3]
    set_attention_mode(model, "sample")  # subsample in eval, so that the patched layers really differ
    mods = {idx: m[0] for idx, m in attention_modules(model).items()}
    calls, inputs = [], {}
    for idx, mod in mods.items():
        kernel = getattr(mod, "attnlab_kernel", None)
        assert (kernel is not None) == (idx in chosen)
        if kernel is not None:
            kernel.register_forward_hook(lambda m, a, o, idx=idx: calls.append(idx))
    hook = mods[2].register_forward_pre_hook(lambda m, a, kw: inputs.update(args=a, kwargs=kw), with_kwargs=True)
    _, out = attn_outputs(model, x, attention_mask=am)
    hook.remove()
    assert calls == [1, 3]
    assert torch.equal(out[0], ref[0])  # before the first patched layer: same input, same output
    assert not torch.allclose(out[1], ref[1], atol=1e-3)
    # Layer 2 is unpatched but sees layer 1's changed output: it must give exactly what the model's own
    # attention gives on that input.
    with torch.no_grad(), original_attention(model):
        assert model.config._attn_implementation == "sdpa"
        own = mods[2](*inputs["args"], **inputs["kwargs"])[0]
    assert model.config._attn_implementation == "attnlab"
    assert torch.equal(out[2], own)


def test_ssa_in_eval_is_dense_and_self_ensemble_mode_samples():
    model = tiny_gpt2()
    x = ids(n=40)
    with torch.no_grad():
        ref = model(x).logits
        patch_model(model, "ssa", {"factor": 4}, layers="all")
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-5, atol=1e-5)
        set_attention_mode(model, "sample")
        a, b = model(x).logits, model(x).logits
    assert not torch.allclose(a, ref, atol=1e-3)
    assert not torch.allclose(a, b, atol=1e-3)


def test_kv_cache_decoding_falls_back_to_exact_or_refuses():
    model = tiny_llama()
    prompt = ids(b=1, n=12)
    ref = model.generate(prompt, max_new_tokens=4, do_sample=False)
    patch_model(model, "ssa", {"factor": 4}, layers="all")  # in eval SSA is exact: the outputs must agree
    kernel_calls = []
    for mods in attention_modules(model).values():
        mods[0].attnlab_kernel.register_forward_hook(lambda m, a, o: kernel_calls.append(a[0].shape[2]))
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    assert kernel_calls == [12, 12, 12]  # the prefill only; the decoding steps ran the model's own attention
    patch_model(model, "exact", layers="all", decode="refuse")
    with pytest.raises(UserError, match="prefill only"):
        model.generate(prompt, max_new_tokens=2, do_sample=False)


def test_training_dropout_is_applied_by_exact_and_refused_by_others():
    model = tiny_gpt2(attn_pdrop=0.5, resid_pdrop=0.0, embd_pdrop=0.0).train()
    x = ids()
    torch.manual_seed(1)
    ref = model(x).logits
    patch_model(model, "exact", layers="all")
    torch.manual_seed(1)
    out = model(x).logits
    torch.testing.assert_close(out, ref)  # the same dropout draws
    torch.manual_seed(2)
    assert not torch.allclose(model(x).logits, ref, atol=1e-3)  # and dropout is really on
    patch_model(model, "ssa", layers="all")
    with pytest.raises(UserError, match="dropout"):
        model(x)
    model.config.attn_pdrop = 0.0
    for mod in model.modules():
        if hasattr(mod, "attn_dropout"):
            mod.attn_dropout.p = 0.0
    model(x).logits.sum().backward()  # SSA trains (subsampled) once dropout is off


def test_unpatch_restores_the_model():
    model = tiny_llama()
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
    n_params = len(model.state_dict())
    patch_model(model, "ssa", layers="all")
    patch_model(model, "exact", layers="first:2")  # re-patching replaces the earlier patch
    assert [i for i, m in attention_modules(model).items() if hasattr(m[0], "attnlab_kernel")] == [0, 1]
    unpatch_model(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any("attnlab" in name for name, _ in model.named_modules())
    assert len(model.state_dict()) == n_params
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: patch_model(m, "nope"), "unknown attention"),
        (lambda m: patch_model(m, "exact", layers="last:x"), "bad layer selection"),
        (lambda m: patch_model(m, "exact", layers=[0, 7]), "names layers"),
        (lambda m: patch_model(m, "ssa", {"factr": 2}), "unknown option"),
        (lambda m: patch_model(m, "exact", decode="maybe"), "decode"),
    ],
)
def test_bad_requests_are_user_errors(call, message):
    model = tiny_llama()
    with pytest.raises(UserError, match=message):
        call(model)
    assert model.config._attn_implementation == "sdpa"  # a failed patch leaves the model as it was
    patch_model(model, "exact", layers="0")
    with pytest.raises(UserError, match=message):
        call(model)
    assert [i for i, m in attention_modules(model).items() if hasattr(m[0], "attnlab_kernel")] == [0]
    assert model.config._attn_implementation == "attnlab"


def test_kernel_mask_reduces_causal_padding_to_a_key_mask_and_keeps_other_patterns():
    n = 6
    keys = torch.tensor([[False, False, True, True, True, True], [True, True, True, True, False, False]])
    full = causal_mask(n, n) & keys[:, None, None, :]
    m, causal = kernel_mask(full, True, n, n)
    assert causal and m.shape == (2, 1, 1, n) and torch.equal(m[:, 0, 0], keys)
    assert kernel_mask(causal_mask(n, n)[None, None].expand(2, 1, n, n), True, n, n) == (None, True)
    window = full & ~causal_mask(n, n).tril(-3)[None, None]  # a sliding window is not causal ∧ padding
    m, causal = kernel_mask(window, True, n, n)
    assert not causal and torch.equal(m, window)
    additive = torch.zeros(2, 1, n, n).masked_fill(~full, torch.finfo(torch.float32).min)
    m, causal = kernel_mask(additive, True, n, n)
    assert causal and torch.equal(m[:, 0, 0], keys)
    with pytest.raises(UserError, match="additive attention bias"):
        kernel_mask(additive + 0.5, True, n, n)


def test_hyper_with_min_seq_len_at_least_n_equals_exact():
    model = tiny_llama()
    x, am = ids(n=48), padded(48)
    with torch.no_grad():
        ref = model(x, attention_mask=am).logits
        for prescore in ("none", "kmeans", "kmedian", "leverage", "norm"):
            patch_model(model, "hyper", {"min_seq_len": 48, "prescore": prescore}, layers="all")
            out = model(x, attention_mask=am).logits
            torch.testing.assert_close(out[am.bool()], ref[am.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prescore", ["none", "kmeans", "kmedian", "leverage", "norm"])
def test_active_hyper_gets_causality_and_a_key_mask_and_approximates(prescore):
    model = tiny_llama()
    x, am = ids(n=64), padded(64)
    real = am.bool()
    with torch.no_grad():
        ref = model(x, attention_mask=am).logits
    opts = {"min_seq_len": 16, "block_size": 8, "sample_size": 8, "lsh_bits": 3, "prescore": prescore, "top_k": 8}
    patch_model(model, "hyper", opts, layers="last:2")
    seen = []
    for idx, mods in attention_modules(model).items():
        if idx:
            mods[0].attnlab_kernel.register_forward_hook(
                lambda m, a, kw, o: seen.append((kw["causal"], kw["mask"] if kw["mask"] is None else kw["mask"].shape)),
                with_kwargs=True)
    with torch.no_grad():
        out = model(x, attention_mask=am).logits
        model(x)
    # The padded batch arrives as causal + a [B, 1, 1, N] key mask; the unpadded one as causal alone.
    assert seen == [(True, torch.Size([2, 1, 1, 64]))] * 2 + [(True, None)] * 2
    assert torch.isfinite(out[real]).all()
    assert not torch.allclose(out[real], ref[real], atol=1e-4)  # hyper is really approximating here
    # A random tiny model attends almost uniformly; hyper's estimate stays in the right range.
    assert (out[real] - ref[real]).abs().mean() < 0.5 * ref[real].abs().mean()
