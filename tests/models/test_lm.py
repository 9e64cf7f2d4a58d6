"""The decoder LM: shapes, cached decoding, packed documents, padding, parameter and FLOP counts."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from attnlab.attention import Kernel, reference_attention
from attnlab.errors import UserError
from attnlab.models.blocks import MLP, RMSNorm
from attnlab.models.lm import LM, LMConfig, lm_loss


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=37, n_layer=2, n_head=4, d_model=32, max_seq_len=24)
    return LM(LMConfig(**(base | kw))).eval()


def _tokens(b=2, n=10, vocab=37, seed=1):
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_loss():
    model = _model()
    x = _tokens()
    logits = model(x)
    assert logits.shape == (2, 10, 37)
    logits2, loss = model(x[:, :-1], x[:, 1:])
    torch.testing.assert_close(logits2, logits[:, :-1])
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 37), x[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want)
    # A loss mask drops targets: only the unmasked ones are averaged.
    keep = torch.zeros(2, 9, dtype=torch.bool)
    keep[0, 3:] = True
    _, masked = model(x[:, :-1], x[:, 1:], loss_mask=keep)
    torch.testing.assert_close(masked, F.cross_entropy(logits[0, 3:-1], x[0, 4:]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "kw",
    [dict(pos="rope"), dict(pos="learned"), dict(pos="sinusoidal"), dict(pos="none"),
     dict(pos="rope", n_kv_head=2), dict(pos="learned", n_kv_head=1, norm="rmsnorm", mlp="swiglu")],
    ids=["rope", "learned", "sinusoidal", "nopos", "rope_gqa", "learned_mqa_rms_swiglu"],
)
def test_cached_decoding_equals_full_forward(kw):
    model = _model(**kw)
    x = _tokens(n=12)
    full = model(x)
    cache = model.new_cache()
    outs = [model(x[:, :5], cache=cache)]
    for t in range(5, 12):
        outs.append(model(x[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-4)
    assert all(c.length == 12 for c in cache)


@pytest.mark.parametrize("pos", ["rope", "learned", "sinusoidal", "none"])
def test_token_order_matters_only_with_positions(pos):
    # Without this, "cached equals full" could pass with every token at the same position.
    model = _model(pos=pos, n_layer=1)
    x = torch.tensor([[3, 9, 4, 20, 7]])
    swapped = torch.tensor([[9, 3, 4, 20, 7]])
    same = torch.allclose(model(x)[0, -1], model(swapped)[0, -1], atol=1e-6)
    # One layer of attention with no position signal sees the earlier tokens as a set.
    assert same == (pos == "none")


def test_over_long_sequences_are_refused():
    model = _model(max_seq_len=8)
    with pytest.raises(UserError, match="max_seq_len"):
        model(_tokens(n=9))
    cache = model.new_cache()
    model(_tokens(n=6), cache=cache)
    model(_tokens(n=2), cache=cache)  # exactly the limit is fine
    with pytest.raises(UserError, match="max_seq_len"):
        model(_tokens(n=1), cache=cache)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_packed_documents_do_not_see_each_other(pos):
    model = _model(pos=pos)
    x = _tokens(b=1, n=12)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    base = model(x, doc_ids=doc_ids)
    y = x.clone()
    y[0, :5] = (y[0, :5] + 1) % 37  # change every token of document 1
    changed = model(y, doc_ids=doc_ids)
    torch.testing.assert_close(changed[0, 5:], base[0, 5:], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(changed[0, :5], base[0, :5])
    # Without the document ids, document 2 does see document 1 (so the check above can fail).
    assert not torch.allclose(model(y)[0, 5:], model(x)[0, 5:])
    if pos == "rope":
        # Relative positions: a packed document gives the same logits as the document on its own.
        torch.testing.assert_close(base[0, 5:], model(x[:, 5:])[0], atol=1e-5, rtol=1e-4)


def test_left_padding_leaves_real_tokens_unchanged():
    model = _model(pos="rope", n_kv_head=2)
    real = _tokens(b=1, n=7)
    padded = torch.cat([torch.full((1, 3), 5), real], dim=1)
    valid = torch.tensor([[False] * 3 + [True] * 7])
    out = model(padded, valid=valid)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 3:], model(real), atol=1e-5, rtol=1e-4)
    # Batched with an unpadded row, each row still gets its own answer.
    other = _tokens(b=1, n=10, seed=7)
    both = model(torch.cat([padded, other]), valid=torch.cat([valid, torch.ones(1, 10, dtype=torch.bool)]))
    torch.testing.assert_close(both[0, 3:], model(real)[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[1], model(other)[0], atol=1e-5, rtol=1e-4)
    # The pad tokens' values do not leak in.
    padded2 = padded.clone()
    padded2[0, :3] = 11
    torch.testing.assert_close(model(padded2, valid=valid)[:, 3:], out[:, 3:], atol=1e-6, rtol=1e-5)


def test_padded_prefill_then_cached_decoding():
    model = _model(pos="rope")
    real = _tokens(b=1, n=9)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), real], dim=1)
    valid = torch.tensor([[False] * 2 + [True] * 9])
    cache = model.new_cache()
    outs = [model(padded[:, :6], valid=valid[:, :6], cache=cache)]
    for t in range(6, 11):
        outs.append(model(padded[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1)[:, 2:], model(real), atol=1e-5, rtol=1e-4)


def _hand_count(v, d, n_layer, n_head, n_kv, d_ff, max_len, bias, tied, learned):
    kv = d // n_head * n_kv
    attn = d * d + 2 * d * kv + d * d + (d + 2 * kv + d if bias else 0)
    mlp = d * d_ff + d_ff * d + (d_ff + d if bias else 0)
    norm = d * (2 if bias else 1)
    total = v * d + (max_len * d if learned else 0) + n_layer * (attn + mlp + 2 * norm) + norm + (0 if tied else v * d)
    embeddings = v * d + (max_len * d if learned else 0)
    return total, total - embeddings


@pytest.mark.parametrize("bias, tied, pos", [(False, True, "rope"), (True, False, "learned"), (False, False, "sinusoidal")])
def test_parameter_count_matches_a_hand_count(bias, tied, pos):
    model = LM(LMConfig(vocab_size=11, n_layer=2, n_head=4, n_kv_head=2, d_model=16, d_ff=24, max_seq_len=8,
                        bias=bias, tie_embeddings=tied, pos=pos))
    total, non_emb = _hand_count(11, 16, 2, 4, 2, 24, 8, bias, tied, pos == "learned")
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == non_emb


class _EinsumKernel(Kernel):
    """Reference attention through einsum, which the FLOP counter sees (SDPA's CPU kernel it does not)."""

    def attend(self, q, k, v, *, causal, mask, scale, return_lse):
        return reference_attention(q, k, v, causal=causal, mask=mask, scale=scale)


def test_flops_per_token_matches_a_measured_training_step():
    model = _model(vocab_size=64, d_model=32, n_layer=2, max_seq_len=64)
    for block in model.blocks:
        block.attn.kernel = _EinsumKernel()
    t = 32
    x = _tokens(b=1, n=t + 1, vocab=64)
    with FlopCounterMode(display=False) as counter:
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
    measured = counter.get_total_flops() / t
    formula = model.flops_per_token(t)
    # The formula also counts norm weights as matmul parameters: a fraction of a percent here.
    assert abs(formula - measured) / measured < 0.02, (formula, measured)
    assert model.flops_per_token(2 * t) > formula
    assert model.flops_per_token() == model.flops_per_token(64)


def test_tied_embeddings_share_storage():
    model = _model(tie_embeddings=True)
    assert model.head.weight is model.embed.weight
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()
    with torch.no_grad():
        model.embed.weight[0, 0] = 123.0
    assert model.head.weight[0, 0].item() == 123.0
    untied = _model(tie_embeddings=False)
    assert untied.head.weight.data_ptr() != untied.embed.weight.data_ptr()
    # A state dict round trip keeps the tie.
    fresh = _model(seed=5, tie_embeddings=True)
    fresh.load_state_dict(model.state_dict())
    assert fresh.head.weight is fresh.embed.weight and fresh.head.weight[0, 0].item() == 123.0


@pytest.mark.parametrize("norm, mlp", [("rmsnorm", "gelu"), ("layernorm", "swiglu"), ("rmsnorm", "swiglu")])
def test_norm_and_mlp_variants_run_and_train(norm, mlp):
    model = _model(norm=norm, mlp=mlp).train()
    assert isinstance(model.ln_f, RMSNorm) == (norm == "rmsnorm")
    block_mlp = model.blocks[0].mlp
    assert isinstance(block_mlp, MLP) and block_mlp.kind == mlp
    assert block_mlp.up.out_features == block_mlp.down.in_features * (2 if mlp == "swiglu" else 1)
    x = _tokens(n=9)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(5):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_rmsnorm_normalises():
    norm = RMSNorm(8)
    x = torch.randn(3, 8) * 5
    y = norm(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3), atol=1e-4, rtol=1e-4)


def test_lm_loss_ignores_masked_targets():
    logits = torch.randn(1, 4, 5)
    targets = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[True, False, True, False]])
    want = F.cross_entropy(logits[0, [0, 2]], targets[0, [0, 2]])
    torch.testing.assert_close(lm_loss(logits, targets, mask), want)
