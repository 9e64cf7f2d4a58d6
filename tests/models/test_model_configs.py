"""Model configs refuse bad values when they are made (parse time), with one line naming the option."""

from dataclasses import dataclass

import pytest

from attnlab.attention import AttentionSpec, Capabilities, Kernel, register_kernel, registry
from attnlab.config import from_dict
from attnlab.errors import UserError
from attnlab.models.lm import LM, LMConfig
from attnlab.models.rnn import LSTMLMConfig, LSTMSeq2SeqConfig
from attnlab.models.seq2seq import Seq2SeqConfig

SMALL = dict(vocab_size=16, n_layer=2, n_head=2, d_model=16, max_seq_len=16)


@pytest.mark.parametrize("change, needle", [
    ({"d_model": 0}, "model.d_model must be positive, got 0"),
    ({"n_head": 0}, "model.n_head must be positive, got 0"),
    ({"n_kv_head": -1}, "model.n_kv_head must be positive, got -1"),
    ({"n_kv_head": 0}, "model.n_kv_head must be positive"),
    ({"d_ff": -4}, "model.d_ff must be positive, got -4"),
    ({"vocab_size": 0}, "model.vocab_size"),
    ({"n_layer": 0}, "model.n_layer"),
    ({"max_seq_len": 0}, "model.max_seq_len"),
    ({"rope_base": 0.0}, "model.rope_base"),
    ({"dropout": 2.0}, "model.dropout must be in [0, 1), got 2.0"),
    ({"dropout": 1.0}, "model.dropout"),
    ({"dropout": -0.1}, "model.dropout"),
    ({"dropout": float("nan")}, "model.dropout"),
    ({"d_model": 18, "n_head": 4}, "model.d_model (18) must be divisible by model.n_head (4)"),
    ({"n_head": 4, "n_kv_head": 3}, "model.n_head (4) must be a multiple of model.n_kv_head (3)"),
    ({"d_model": 6, "n_head": 2}, "even head dimension"),  # rope rotates pairs of channels
    ({"d_model": 15, "n_head": 1, "pos": "sinusoidal"}, "even d_model"),
    ({"norm": "batchnorm"}, "model.norm must be one of"),
    ({"attention": AttentionSpec(layers="last:3")}, "model.attention.layers"),
    ({"attention": AttentionSpec(layers="first:9")}, "asks for 9 layers but the model has 2"),
    ({"attention": AttentionSpec(layers="5")}, "model.attention.layers"),
    ({"attention": AttentionSpec(name="nope")}, "unknown attention mechanism 'nope'"),
    ({"attention": AttentionSpec(name="hyper", options={"bogus": 1})}, "unknown option(s) bogus"),
    ({"attention": AttentionSpec(transform="nope")}, "model.attention.transform"),
    ({"attention": AttentionSpec(transform_options={"a": 1})}, "transform is none"),
])
def test_lm_config_refuses(change, needle):
    with pytest.raises(UserError) as e:
        LMConfig(**{**SMALL, **change})
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_lm_config_is_checked_at_parse_time():
    # from_dict builds the dataclass, so the CLI and YAML files fail before a model or a folder exists.
    with pytest.raises(UserError, match="model.d_model must be positive"):
        from_dict(LMConfig, {"d_model": 0, "n_head": 1})
    with pytest.raises(UserError, match="last:99"):
        from_dict(LMConfig, {"n_layer": 1, "attention": {"layers": "last:99"}})


def test_edge_values_are_accepted():
    LM(LMConfig(**SMALL, dropout=0.0, n_kv_head=1, attention=AttentionSpec(name="hyper", layers="last:2")))
    LM(LMConfig(**SMALL, attention=AttentionSpec(layers="first:0")))
    LMConfig(**{**SMALL, "d_model": 15, "n_head": 3, "pos": "learned"})  # odd widths are fine without rotation


@pytest.mark.parametrize("change, needle", [
    ({"d_model": 0}, "model.d_model must be positive"),
    ({"n_dec_layer": 0}, "model.n_dec_layer"),
    ({"vocab_size": 2}, "model.vocab_size must be at least 3"),
    ({"dropout": 1.5}, "model.dropout"),
    ({"d_model": 30, "n_head": 4}, "divisible"),
    ({"d_model": 9, "n_head": 1}, "even"),
    ({"attention_in": ["decoder", "middle"]}, "model.attention_in names ['middle']"),
    ({"pad_id": 1}, "distinct"),
    ({"eos_id": 40}, "distinct ids in [0, vocab_size=32)"),
    ({"n_layer": 3, "n_dec_layer": 1, "attention": AttentionSpec(layers="last:2")}, "(decoder)"),
])
def test_seq2seq_config_refuses(change, needle):
    base = dict(vocab_size=32, n_layer=2, n_head=2, d_model=16, max_seq_len=16)
    with pytest.raises(UserError) as e:
        Seq2SeqConfig(**{**base, **change})
    assert needle in str(e.value)


@dataclass
class _NoOptions:
    pass


def test_seq2seq_capabilities_are_checked_only_where_the_mechanism_runs():
    # A mechanism that cannot decode from a cache is refused in cross-attention, which needs it, but may run
    # in the encoder alone.
    register_kernel("_test_nocache", _NoOptions, Capabilities(kv_cache=False), "test kernel")(Kernel)
    try:
        base = dict(vocab_size=32, n_layer=2, n_head=2, d_model=16, attention=AttentionSpec(name="_test_nocache"))
        with pytest.raises(UserError, match="lacks kv_cache"):
            Seq2SeqConfig(**base, attention_in=["encoder", "cross"])
        Seq2SeqConfig(**base, attention_in=["encoder"])
    finally:
        registry._KERNELS.pop("_test_nocache")


@pytest.mark.parametrize("cls, change, needle", [
    (LSTMLMConfig, {"d_model": 0}, "lstm.d_model"),
    (LSTMLMConfig, {"dropout": 1.0}, "lstm.dropout"),
    (LSTMSeq2SeqConfig, {"d_model": 7}, "even"),
    (LSTMSeq2SeqConfig, {"n_layer": 0}, "lstm.n_layer"),
    (LSTMSeq2SeqConfig, {"vocab_size": 2}, "distinct ids"),
])
def test_lstm_configs_refuse(cls, change, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        cls(**change)
