"""KV shifting retrofitted into a transformers Llama: identity at first, the paper's mix before rotary after."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from attnlab.errors import UserError
from attnlab.integrations.hf import attention_modules
from attnlab.integrations.hf_transform import (add_transform, load_transform_state, remove_transform,
                                               transform_state)

VOCAB = 61


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def ids(n=20):
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(0))


def test_identity_start_changes_nothing_and_removal_restores():
    model, x = tiny_llama(), ids()
    with torch.no_grad():
        ref = model(x).logits
        assert add_transform(model, "kv_shift", layers="last:1") == [1]
        assert torch.equal(model(x).logits, ref)
        n_new = sum(p.numel() for n, p in model.named_parameters() if "attnlab_transform" in n)
        assert n_new == 2 * 2 * 2  # alpha and beta, [kv heads, window + 1]
        remove_transform(model)
        assert torch.equal(model(x).logits, ref)
    assert not any("attnlab" in n for n, _ in model.named_parameters())


def test_shift_mixes_raw_projections_before_rotary():
    """Against the attention written out by hand in float64: k̂_i = a0·k_i + a1·k_{i-1} on k_proj's output, then
    rotary, then causal softmax attention over grouped heads."""
    model = tiny_llama().double()
    add_transform(model, "kv_shift", layers="0")
    mod = attention_modules(model)[0][0]
    alpha, beta = torch.tensor([[0.3, 0.7], [0.9, 0.1]]), torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    load_transform_state(model, {"layer.0.alpha": alpha, "layer.0.beta": beta})
    h = torch.randn(2, 12, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(12)[None].expand(2, 12)
    cos, sin = model.model.rotary_emb(h, pos)
    with torch.no_grad():
        got = mod(h, position_embeddings=(cos, sin), attention_mask=None)[0]

        def heads(x, n):
            return x.view(2, 12, n, 8).transpose(1, 2)

        def shift(x, coef):  # [B, H, N, D], coef [H, 2]
            prev = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1]], dim=2)
            return coef[:, 0, None, None].double() * x + coef[:, 1, None, None].double() * prev

        q = heads(mod.q_proj(h), 4)
        # The raw projections (calling k_proj itself would run the hook under test).
        k = shift(heads(torch.nn.functional.linear(h, mod.k_proj.weight), 2), alpha)
        v = shift(heads(torch.nn.functional.linear(h, mod.v_proj.weight), 2), beta)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        s = (q @ k.mT) / 8**0.5
        s = s.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
        want = mod.o_proj((s.softmax(-1) @ v).transpose(1, 2).reshape(2, 12, 32))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_state_round_trips_and_cached_decoding_is_refused():
    model, x = tiny_llama(), ids(8)
    add_transform(model, "kv_shift", layers="all")
    state = {k: torch.rand_like(v) for k, v in transform_state(model).items()}
    load_transform_state(model, state)
    assert all(torch.equal(transform_state(model)[k], v) for k, v in state.items())
    with pytest.raises(UserError, match="use_cache=False"):
        model.generate(x, max_new_tokens=3, do_sample=False, use_cache=True)
    out = model.generate(x, max_new_tokens=3, do_sample=False, use_cache=False)
    assert out.shape == (2, 11)


def test_bad_requests_are_user_errors():
    model = tiny_llama()
    with pytest.raises(UserError, match="unknown transform"):
        add_transform(model, "nope")
    with pytest.raises(UserError, match="window"):
        add_transform(model, "kv_shift", {"window": 0})
