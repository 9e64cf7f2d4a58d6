import math
from types import SimpleNamespace

import pytest
import torch

from attnlab.errors import UserError
from attnlab.inference.beam import beam_search, decode_all, greedy_decode, length_penalty
from attnlab.models.rnn import LSTMSeq2Seq, LSTMSeq2SeqConfig
from attnlab.models.seq2seq import Seq2SeqConfig, Transformer

PAD, BOS, EOS = 0, 1, 2


def sources():
    return torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, 0, 0], [11, 2, 0, 0, 0], [3, 4, 5, 2, 0]])


def transformer(seed=0):
    torch.manual_seed(seed)
    return Transformer(Seq2SeqConfig(vocab_size=14, n_layer=2, n_head=2, d_model=16, d_ff=32, dropout=0.0,
                                     max_seq_len=24)).eval()


def lstm(seed=0):
    torch.manual_seed(seed)
    return LSTMSeq2Seq(LSTMSeq2SeqConfig(vocab_size=14, d_model=16, n_layer=1, dropout=0.0)).eval()


@pytest.mark.parametrize("make", [transformer, lstm])
def test_beam_of_one_is_greedy(make):
    for seed in range(3):
        model = make(seed)
        # Untrained models wander: some sentences end early, others run into max_len.
        assert beam_search(model, sources(), beam_size=1, alpha=0.0, max_len=12) == greedy_decode(model, sources(), 12)


class MarkovModel:
    """A decodable toy whose next-token distribution depends only on the last token: a table [V, V]."""

    def __init__(self, table):
        self.table = torch.log(torch.tensor(table, dtype=torch.float32))
        self.cfg = SimpleNamespace(pad_id=PAD, bos_id=BOS, eos_id=EOS)
        self.max_decode_len = 100
        self.training = False

    def start(self, src):
        return None

    def step(self, state, tokens):
        return self.table[tokens], state

    def reorder(self, state, index):
        return state

    def eval(self):
        return self

    def train(self, mode=True):
        return self


# Tokens: 0 pad, 1 bos, 2 eos, 3 "a", 4 "b", 5 "c". From BOS, "a" (0.5) beats "b" (0.4), but after "a" the
# mass spreads thin, while "b" ends at once with probability 0.9: greedy takes a..., beam finds "b".
TRAP = [
    [0, 0, 1.0, 0, 0, 0],
    [0, 0, 0.1, 0.5, 0.4, 0],
    [0, 0, 1.0, 0, 0, 0],
    [0, 0, 0.3, 0.35, 0, 0.35],
    [0, 0, 0.9, 0, 0, 0.1],
    [0, 0, 0.6, 0, 0, 0.4],
]


def all_hypotheses(table, max_len):
    """Every finished sequence of at most max_len tokens (EOS included) with its log-probability."""
    out = []

    def walk(last, seq, logp):
        for tok in range(len(table)):
            p = table[last][tok]
            if p == 0 or tok in (PAD, BOS):
                continue
            if tok == EOS:
                out.append((seq, logp + math.log(p)))
            elif len(seq) + 2 <= max_len:
                walk(tok, seq + [tok], logp + math.log(p))

    walk(BOS, [], 0.0)
    return out


def test_beam_beats_greedy_on_a_trap_and_scores_with_the_length_penalty():
    model = MarkovModel(TRAP)
    src = torch.tensor([[3, 2]])
    assert greedy_decode(model, src, 6) == [[3, 3, 3, 3, 3]]  # greedy: always "a" (then forced to end)
    hyps, scores = beam_search(model, src, beam_size=2, alpha=0.6, max_len=6, return_scores=True)
    assert hyps == [[4]]
    assert scores[0] == pytest.approx(math.log(0.4 * 0.9) / length_penalty(2, 0.6))


# A peaked model, as label smoothing makes them: one right token at 0.97, every other one (EOS included) at the
# floor. Early EOS candidates rank second at every step; stopping once K hypotheses have finished (fairseq's rule)
# would return one of them while "a b c" is still being written.
PEAKED = [
    [0, 0, 1.0, 0, 0, 0],
    [0, 0, 0.012, 0.97, 0.009, 0.009],
    [0, 0, 1.0, 0, 0, 0],
    [0, 0, 0.012, 0.009, 0.97, 0.009],
    [0, 0, 0.012, 0.009, 0.009, 0.97],
    [0, 0, 0.97, 0.01, 0.01, 0.01],
]


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_early_eos_candidates_do_not_end_the_search(alpha):
    model = MarkovModel(PEAKED)
    src = torch.tensor([[3, 2]])
    assert greedy_decode(model, src, 8) == [[3, 4, 5]]
    assert beam_search(model, src, beam_size=2, alpha=alpha, max_len=8) == [[3, 4, 5]]


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wide_beam_finds_the_exhaustive_optimum(alpha):
    model = MarkovModel(TRAP)
    best_seq, best = max(all_hypotheses(TRAP, 4), key=lambda h: h[1] / length_penalty(len(h[0]) + 1, alpha))
    hyps, scores = beam_search(model, torch.tensor([[3, 2]]), beam_size=3, alpha=alpha, max_len=4, return_scores=True)
    assert hyps == [best_seq]
    assert scores[0] == pytest.approx(best / length_penalty(len(best_seq) + 1, alpha))


def test_length_penalty_formula():
    assert length_penalty(7, 0.0) == 1.0
    assert length_penalty(1, 1.0) == pytest.approx(1.0)
    assert length_penalty(10, 0.6) == pytest.approx((15 / 6) ** 0.6)


def test_batched_beam_equals_one_sentence_at_a_time():
    model = transformer(4)
    src = sources()
    together = beam_search(model, src, beam_size=3, alpha=0.6, max_len=10)
    for i in range(src.shape[0]):
        s = src[i][src[i] != PAD][None]
        assert beam_search(model, s, beam_size=3, alpha=0.6, max_len=10) == [together[i]]


def test_decode_all_keeps_input_order():
    model = transformer(5)
    src = sources()
    lists = [row[row != PAD].tolist() for row in src]
    one_by_one = [greedy_decode(model, torch.tensor([s]), 9)[0] for s in lists]
    assert decode_all(model, lists, method="greedy", max_len=9, batch_size=3) == one_by_one
    with pytest.raises(UserError, match="greedy or beam"):
        decode_all(model, lists, method="sample")


def test_max_len_counts_the_eos_and_is_capped_by_the_model():
    model = MarkovModel([[0, 0, 1.0, 0], [0, 0, 1e-6, 1 - 1e-6], [0, 0, 1.0, 0], [0, 0, 1e-6, 1 - 1e-6]])
    assert greedy_decode(model, torch.tensor([[3, 2]]), 4) == [[3, 3, 3]]
    assert beam_search(model, torch.tensor([[3, 2]]), beam_size=1, max_len=4) == [[3, 3, 3]]
    model.max_decode_len = 2
    assert greedy_decode(model, torch.tensor([[3, 2]]), 4) == [[3]]
