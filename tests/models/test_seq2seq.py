import math

import pytest
import torch

from attnlab.attention import AttentionSpec
from attnlab.attention import registry
from attnlab.attention.exact import ExactAttention, ExactConfig
from attnlab.errors import UserError
from attnlab.models.seq2seq import Seq2SeqConfig, Transformer


def tiny(**kw):
    base = dict(vocab_size=23, n_layer=2, n_head=2, d_model=16, d_ff=32, dropout=0.0, max_seq_len=32)
    base.update(kw)
    return Seq2SeqConfig(**base)


def batch():
    # Right-padded sources of different lengths (0 = pad, 2 = EOS), decoder inputs start with BOS (1).
    src = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, 0, 0], [11, 2, 0, 0, 0]])
    tgt_in = torch.tensor([[1, 12, 13, 14], [1, 15, 16, 0], [1, 17, 0, 0]])
    return src, tgt_in


@pytest.mark.parametrize("norm_position", ["post", "pre"])
@pytest.mark.parametrize("transform", ["none", "kv_shift"])
def test_incremental_decoder_equals_full_decoder(norm_position, transform):
    torch.manual_seed(0)
    model = Transformer(tiny(norm_position=norm_position, attention=AttentionSpec(transform=transform))).eval()
    assert model.incremental
    src, tgt_in = batch()
    full = model(src, tgt_in)
    state = model.start(src)
    steps = []
    for t in range(tgt_in.shape[1]):
        logits, state = model.step(state, tgt_in[:, t])
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_reorder_keeps_incremental_decoding_exact():
    torch.manual_seed(1)
    model = Transformer(tiny()).eval()
    src, tgt_in = batch()
    state = model.start(src)
    _, state = model.step(state, tgt_in[:, 0])
    # Hypotheses swap and duplicate (as in beam search): each row must continue its new source's decoding.
    index = torch.tensor([2, 0, 0])
    state = model.reorder(state, index)
    _, state = model.step(state, tgt_in[index, 1])
    logits, _ = model.step(state, tgt_in[index, 2])
    full = model(src[index], tgt_in[index, :3])
    torch.testing.assert_close(logits, full[:, -1], atol=1e-5, rtol=1e-5)


def test_decoder_without_cache_capability_recomputes_the_prefix(monkeypatch):
    entry = registry.Entry("nocache_test", ExactConfig, ExactAttention,
                           registry.Capabilities(kv_cache=False), "exact, declared without cache decoding")
    monkeypatch.setitem(registry._KERNELS, "nocache_test", entry)
    torch.manual_seed(2)
    model = Transformer(tiny(attention=AttentionSpec(name="nocache_test"), attention_in=["decoder"])).eval()
    assert not model.incremental
    src, tgt_in = batch()
    state = model.start(src)
    outs = []
    for t in range(tgt_in.shape[1]):
        logits, state = model.step(state, tgt_in[:, t])
        outs.append(logits)
    assert state.self_caches is None
    torch.testing.assert_close(torch.stack(outs, 1), model(src, tgt_in), atol=1e-5, rtol=1e-5)


def test_mechanism_lacking_a_needed_capability_is_refused(monkeypatch):
    entry = registry.Entry("causal_only_test", ExactConfig, ExactAttention,
                           registry.Capabilities(noncausal=False), "exact, declared causal only")
    monkeypatch.setitem(registry._KERNELS, "causal_only_test", entry)
    spec = AttentionSpec(name="causal_only_test")
    with pytest.raises(UserError, match="causal_only_test.*lacks noncausal"):
        Transformer(tiny(attention=spec))
    # In the decoder's self-attention only, it is allowed: the registry checks each stack on its own.
    Transformer(tiny(attention=spec, attention_in=["decoder"]))


def test_padding_does_not_change_a_sentence():
    torch.manual_seed(3)
    model = Transformer(tiny()).eval()
    src, tgt_in = batch()
    together = model(src, tgt_in)
    for i in range(src.shape[0]):
        s = src[i][src[i] != 0][None]
        t = tgt_in[i][tgt_in[i] != 0][None]
        alone = model(s, t)
        torch.testing.assert_close(together[i, : t.shape[1]], alone[0], atol=1e-5, rtol=1e-5)


def test_post_ln_normalises_every_sublayer_output_and_pre_ln_does_not():
    torch.manual_seed(4)
    src, _ = batch()
    for position, normalised in [("post", True), ("pre", False)]:
        model = Transformer(tiny(norm_position=position)).eval()
        x = model._embed(src)
        valid = src != 0
        y = model.encoder[0](x, valid, torch.ones_like(valid))
        # Post-LN ends each layer with LayerNorm (unit gain, zero bias at init): zero mean, unit variance.
        is_norm = torch.allclose(y.mean(-1), torch.zeros(()), atol=1e-5) and torch.allclose(
            y.var(-1, unbiased=False), torch.ones(()), atol=1e-3)
        assert is_norm == normalised


def test_shared_scaled_embeddings_and_sinusoidal_positions():
    torch.manual_seed(5)
    cfg = tiny()
    model = Transformer(cfg).eval()
    # No separate output matrix: the pre-softmax projection is the embedding, so logits follow it.
    assert not any("head" in n for n, _ in model.named_parameters())
    src, tgt_in = batch()
    before = model(src, tgt_in)
    with torch.no_grad():
        model.embed.weight[20] += torch.randn(cfg.d_model)  # a token that appears in no input: only the output projection sees it
    after = model(src, tgt_in)
    changed = (after - before).abs().amax(dim=(0, 1)) > 1e-6
    assert changed.tolist() == [i == 20 for i in range(cfg.vocab_size)]
    ids = torch.tensor([[7, 7]])
    e = model._embed(ids)
    expect = model.embed.weight[7] * math.sqrt(cfg.d_model)
    torch.testing.assert_close(e[0, 0], expect + torch.tensor([0.0, 1.0] * (cfg.d_model // 2)))
    pos1 = torch.tensor([math.sin(1.0 / 10000 ** (2 * (i // 2) / cfg.d_model)) if i % 2 == 0 else
                         math.cos(1.0 / 10000 ** (2 * (i // 2) / cfg.d_model)) for i in range(cfg.d_model)])
    torch.testing.assert_close(e[0, 1], expect + pos1)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(6)
    model = Transformer(tiny(dropout=0.1))
    src, tgt_in = batch()
    model(src, tgt_in).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_bad_configs_are_refused():
    with pytest.raises(UserError, match="attention_in"):
        Transformer(tiny(attention_in=["encoder", "middle"]))
    with pytest.raises(UserError, match="distinct"):
        Transformer(tiny(bos_id=0))
    model = Transformer(tiny(max_seq_len=4))
    with pytest.raises(UserError, match="max_seq_len"):
        model(torch.tensor([[5, 6, 7, 8, 2]]), torch.tensor([[1, 5]]))
    with pytest.raises(UserError, match="right-padded"):
        model(torch.tensor([[0, 5, 2]]), torch.tensor([[1, 5]]))
