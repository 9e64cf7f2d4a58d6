import pytest
import torch

from attnlab.errors import UserError
from attnlab.models.lm import LM, LMConfig
from attnlab.models.rnn import LSTMLM, LSTMLMConfig, LSTMSeq2Seq, LSTMSeq2SeqConfig, match_lstm_width


def test_lstm_lm_shapes_loss_and_causality():
    torch.manual_seed(0)
    model = LSTMLM(LSTMLMConfig(vocab_size=30, d_model=16, n_layer=2)).eval()
    idx = torch.randint(0, 30, (2, 9))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 9, 30) and loss.ndim == 0
    # Changing a later token leaves earlier predictions alone.
    idx2 = idx.clone()
    idx2[:, 6] = (idx2[:, 6] + 1) % 30
    torch.testing.assert_close(model(idx2)[:, :6], logits[:, :6])
    assert model.head.weight is model.embed.weight


def test_width_matching_hits_the_transformer_parameter_count():
    lm = LM(LMConfig(vocab_size=256, n_layer=4, d_model=128, n_head=4))
    target = lm.num_params(non_embedding=False)
    width = match_lstm_width(target, lambda w: LSTMLM(LSTMLMConfig(vocab_size=256, d_model=w, n_layer=2)))
    got = LSTMLM(LSTMLMConfig(vocab_size=256, d_model=width, n_layer=2)).num_params()
    step_cost = LSTMLM(LSTMLMConfig(vocab_size=256, d_model=width + 8, n_layer=2)).num_params() - got
    assert abs(got - target) <= step_cost  # as close as the width grid allows


def test_seq2seq_step_by_step_equals_forward_and_ignores_padding():
    torch.manual_seed(1)
    model = LSTMSeq2Seq(LSTMSeq2SeqConfig(vocab_size=20, d_model=16, n_layer=2, dropout=0.0)).eval()
    src = torch.tensor([[5, 6, 7, 2], [8, 2, 0, 0]])
    tgt_in = torch.tensor([[1, 9, 10], [1, 11, 12]])
    full = model(src, tgt_in)
    state = model.start(src)
    for t in range(3):
        logits, state = model.step(state, tgt_in[:, t])
        torch.testing.assert_close(logits, full[:, t])
    alone = model(src[1:, :2], tgt_in[1:])
    torch.testing.assert_close(alone[0], full[1], atol=1e-6, rtol=1e-5)
    full.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_seq2seq_refuses_bad_input():
    with pytest.raises(UserError, match="even"):
        LSTMSeq2Seq(LSTMSeq2SeqConfig(d_model=15))
    model = LSTMSeq2Seq(LSTMSeq2SeqConfig(vocab_size=20, d_model=8, n_layer=1))
    with pytest.raises(UserError, match="empty"):
        model.start(torch.tensor([[0, 0]]))
