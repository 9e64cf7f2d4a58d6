"""Swapping kernels into a built model goes through the same capability check as building it."""

from __future__ import annotations

import pytest
import torch

from attnlab.attention import AttentionSpec, registry
from attnlab.attention.exact import ExactAttention, ExactConfig
from attnlab.attention.swap import attention_layers, swap_attention, swapped_attention
from attnlab.errors import UserError
from attnlab.models.lm import LM, LMConfig
from attnlab.models.seq2seq import Seq2SeqConfig, Transformer


def _declare(monkeypatch, name, caps):
    """Exact attention registered under `name` with capabilities `caps`, for this test only."""
    entry = registry.Entry(name, ExactConfig, ExactAttention, caps, "exact, test-only capabilities")
    monkeypatch.setitem(registry._KERNELS, name, entry)
    return name


def _kinds(model):
    return [id(a.kernel) for a in attention_layers(model)]


def test_a_kernel_lacking_causal_is_refused_in_a_language_model_and_nothing_changes(monkeypatch):
    name = _declare(monkeypatch, "_test_noncausal_only", registry.Capabilities(causal=False))
    lm = LM(LMConfig(vocab_size=16, n_layer=2, d_model=16, n_head=2))
    before = _kinds(lm)
    with pytest.raises(UserError) as e:
        swap_attention(lm, name, {}, "all")
    msg = str(e.value)
    assert name in msg and "lacks causal" in msg and "exact" in msg and "\n" not in msg
    assert _kinds(lm) == before  # refused before any layer was touched
    with pytest.raises(UserError, match="lacks causal"), swapped_attention(lm, name, {}, "last:1"):
        pass
    assert _kinds(lm) == before


def test_a_kernel_is_checked_against_each_layers_own_use(monkeypatch):
    causal_only = _declare(monkeypatch, "_test_causal_only", registry.Capabilities(noncausal=False))
    torch.manual_seed(0)
    model = Transformer(Seq2SeqConfig(vocab_size=23, n_layer=2, n_head=2, d_model=16, d_ff=32, max_seq_len=32))
    layers = attention_layers(model)
    causal = [i for i, a in enumerate(layers) if a.need.get("causal")]
    assert causal and len(causal) < len(layers)  # decoder self-attention only
    with pytest.raises(UserError, match="lacks noncausal"):
        swap_attention(model, causal_only, {}, "all")
    swapped = swap_attention(model, causal_only, {}, ",".join(map(str, causal)))
    assert [layer for layer, _ in swapped] == [layers[i] for i in causal]
    # An explicit need adds to the layer's own.
    with pytest.raises(UserError, match="lacks noncausal"):
        swap_attention(model, causal_only, {}, str(causal[0]), need={"noncausal": True})


def test_a_capable_kernel_swaps_in_and_restores():
    lm = LM(LMConfig(vocab_size=16, n_layer=2, d_model=16, n_head=2, attention=AttentionSpec()))
    before = _kinds(lm)
    with swapped_attention(lm, "ssa", {"factor": 2}, "0"):
        assert [type(a.kernel).__name__ for a in attention_layers(lm)] == ["SSAAttention", "ExactAttention"]
    assert _kinds(lm) == before
