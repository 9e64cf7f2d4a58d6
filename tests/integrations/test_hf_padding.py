"""Padded batches through patched transformers models: real tokens must not see what the padding holds.

Tiny random models built from configs (a Llama decoder, a BERT encoder), no downloads."""

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from attnlab.integrations.hf import attention_modules, kernel_mask, patch_model

VOCAB = 61
PRESCORE = ["none", "kmeans", "kmedian", "leverage", "norm"]
# Active at 64 tokens: blocks of 8, exact only up to 16 keys.
OPTS = {"min_seq_len": 16, "block_size": 8, "sample_size": 8, "lsh_bits": 3, "top_k": 8}


def tiny_bert(layers=2):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=256, attention_probs_dropout_prob=0.0,
                     hidden_dropout_prob=0.0, pad_token_id=0)
    return BertModel._from_config(cfg, attn_implementation="sdpa").eval()


def tiny_llama(layers=2):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def batch(n=64, seed=0):
    """Row 0 left-padded by 9, row 1 right-padded by 21; the pads' ids come from `seed`."""
    x = torch.randint(1, VOCAB, (2, n), generator=torch.Generator().manual_seed(0))
    am = torch.ones(2, n, dtype=torch.long)
    am[0, :9] = 0
    am[1, -21:] = 0
    junk = torch.randint(1, VOCAB, (2, n), generator=torch.Generator().manual_seed(100 + seed))
    return torch.where(am.bool(), x, junk), am


def outputs(model, x, am):
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=am)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def record_masks(model):
    seen = []
    for mods in attention_modules(model).values():
        for mod in mods:
            kernel = getattr(mod, "attnlab_kernel", None)
            if kernel is not None:
                kernel.register_forward_hook(
                    lambda m, a, kw, o: seen.append((kw["causal"], None if kw["mask"] is None else kw["mask"].shape)),
                    with_kwargs=True)
    return seen


@pytest.mark.parametrize("prescore", PRESCORE)
@pytest.mark.parametrize("build", [tiny_llama, tiny_bert])
def test_pad_token_ids_do_not_move_real_tokens(build, prescore):
    model = build()
    patch_model(model, "hyper", {**OPTS, "prescore": prescore}, layers="all")
    seen = record_masks(model)
    x1, am = batch(seed=1)
    x2, _ = batch(seed=2)
    assert not torch.equal(x1, x2)
    real = am.bool()
    a, b = outputs(model, x1, am), outputs(model, x2, am)
    torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-5)
    # Both layers got the cheap form: a key-padding mask, with causality as a flag (decoder) or without.
    causal = build is tiny_llama
    assert seen[:2] == [(causal, torch.Size([2, 1, 1, 64]))] * 2
    # ...and the kernel is really approximating (the check above could fail).
    unpatched = build()
    assert not torch.allclose(a[real], outputs(unpatched, x1, am)[real], atol=1e-4)


def test_kernel_mask_reduces_an_encoders_padding_and_keeps_other_bidirectional_patterns():
    n = 6
    keys = torch.tensor([[False, True, True, True, True, True], [True, True, True, False, False, False]])
    full = keys[:, None, None, :].expand(2, 1, n, n)
    for m in (full, full.contiguous()):
        got, causal = kernel_mask(m, False, n, n)
        assert not causal and got.shape == (2, 1, 1, n) and torch.equal(got[:, 0, 0], keys)
    assert kernel_mask(torch.ones(2, 1, n, n, dtype=torch.bool), False, n, n) == (None, False)
    additive = torch.zeros(2, 1, n, n).masked_fill(~full, torch.finfo(torch.float32).min)
    got, causal = kernel_mask(additive, False, n, n)
    assert not causal and torch.equal(got[:, 0, 0], keys)
    # Rows that differ (a local window) are not a key mask: passed whole.
    band = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() <= 2
    window = full & band
    got, causal = kernel_mask(window, False, n, n)
    assert not causal and torch.equal(got, window)
