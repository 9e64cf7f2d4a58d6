import numpy as np
import pytest
import torch

from attnlab.data import FILLER, induction_batch, mqar_batch, mqar_gap_probs
from attnlab.errors import UserError


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- induction

@pytest.mark.parametrize("seq_len,prefix_len", [(64, None), (63, None), (50, 20), (41, 40)])
def test_induction_structure(seq_len, prefix_len):
    B, V = 32, 100
    b = induction_batch(B, seq_len, V, gen(0), prefix_len=prefix_len)
    x, y, m = b["x"], b["y"], b["loss_mask"]
    P = seq_len // 2 if prefix_len is None else prefix_len
    assert x.shape == y.shape == m.shape == (B, seq_len) and m.dtype == torch.bool
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.min()) >= 0 and int(x.max()) < V
    assert (m.sum(1) == (seq_len + 1 - P) // 2).all()
    assert not m[:, :P].any()  # nothing in the prefix is predictable
    for row in range(B):
        prefix = x[row, :P].tolist()
        assert len(set(prefix)) == P
        successor = dict(zip(prefix[:-1], prefix[1:]))
        for t in torch.nonzero(m[row]).flatten().tolist():
            # The scored target is what followed the same token in the prefix.
            assert x[row, t].item() in successor
            assert y[row, t].item() == successor[x[row, t].item()]
        # Tokens after the prefix are all copied from it.
        assert set(x[row, P:].tolist()) <= set(prefix)


def test_induction_sources_vary():
    B, T, V = 256, 64, 200
    b = induction_batch(B, T, V, gen(3))
    x, m = b["x"], b["loss_mask"]
    P = T // 2
    # Index in the prefix from which each scored pair was copied.
    src = (x[:, :P, None] == x[:, None, :]).float().argmax(dim=1)  # [B, T]: prefix index of each token
    first_slot = src[:, P]  # the first scored pair sits at the same position in every row...
    assert len(set(first_slot.tolist())) > P // 2  # ...but copies from all over the prefix
    counts = torch.bincount(src[m], minlength=P)
    # j is uniform over 0..P-2: every allowed source used, the last prefix token never (it has no successor)
    assert counts[-1] == 0 and (counts[:-1] > 0).all()
    # Within a row the copied sources are not in positional order either.
    assert (src[:, P:][m[:, P:]].view(B, -1).diff(dim=1) < 0).any(dim=1).float().mean() > 0.9


def test_induction_deterministic_and_seeded():
    a = induction_batch(4, 32, 50, gen(7))
    b = induction_batch(4, 32, 50, gen(7))
    c = induction_batch(4, 32, 50, gen(8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["x"], c["x"])


def test_induction_errors():
    with pytest.raises(UserError, match="exceeds vocab_size"):
        induction_batch(2, 64, 16, gen(0))
    with pytest.raises(UserError, match="no room"):
        induction_batch(2, 10, 64, gen(0), prefix_len=10)
    with pytest.raises(UserError, match="at least 2"):
        induction_batch(2, 3, 64, gen(0))
    with pytest.raises(UserError, match="batch_size"):
        induction_batch(0, 32, 64, gen(0))


# ---------------------------------------------------------------- MQAR

def _kv_table(x_row, k):
    keys, values = x_row[0:2 * k:2].tolist(), x_row[1:2 * k:2].tolist()
    return dict(zip(keys, values))


def test_mqar_structure():
    B, T, V, K = 64, 64, 128, 8
    b = mqar_batch(B, T, V, K, gen(0))
    x, y, m = b["x"], b["y"], b["loss_mask"]
    assert x.shape == y.shape == m.shape == (B, T)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert (m.sum(1) == K).all()
    assert not m[:, :2 * K].any()
    for row in range(B):
        table = _kv_table(x[row], K)
        assert len(table) == K and len(set(table.values())) == K
        assert all(1 <= k < V // 2 for k in table) and all(V // 2 <= v < V for v in table.values())
        scored = torch.nonzero(m[row]).flatten()
        queried = x[row, scored].tolist()
        assert sorted(queried) == sorted(table)  # every key is queried exactly once
        assert y[row, scored].tolist() == [table[q] for q in queried]
        # Outside the key-value block and the query slots, only filler.
        used = torch.zeros(T, dtype=torch.bool)
        used[:2 * K] = True
        used[scored] = True
        used[scored + 1] = True
        assert (x[row, ~used] == FILLER).all()
        assert ((scored - 2 * K) % 2 == 0).all()  # queries sit on slot boundaries


def test_mqar_gaps_follow_power_law():
    B, space = 20000, 24
    T = 2 + 2 * space  # one key-value pair, so each row's gap is one clean draw
    for a in (0.01, 0.5, 1.0):
        b = mqar_batch(B, T, 64, 1, gen(11), power_a=a)
        pos = b["loss_mask"].float().argmax(dim=1)
        gaps = (pos - 2) // 2 + 1
        freq = torch.bincount(gaps, minlength=space + 1)[1:].double() / B
        expected = mqar_gap_probs(space, a)
        tv = 0.5 * (freq - expected).abs().sum().item()
        assert tv < 0.03, (a, tv)
        # Log-log slope of the frequencies is a - 1 (uniform for a = 1).
        slope = np.polyfit(np.log(np.arange(1, space + 1)), np.log(freq.numpy() + 1e-12), 1)[0]
        assert abs(slope - (a - 1)) < 0.1, (a, slope)
    # The check separates the distributions: the a = 0.01 law is far from uniform.
    uniform = torch.full((space,), 1.0 / space, dtype=torch.float64)
    assert 0.5 * (mqar_gap_probs(space, 0.01) - uniform).abs().sum() > 0.3


def test_mqar_deterministic_and_seeded():
    a = mqar_batch(4, 64, 64, 4, gen(5))
    b = mqar_batch(4, 64, 64, 4, gen(5))
    c = mqar_batch(4, 64, 64, 4, gen(6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["x"], c["x"])


def test_mqar_errors():
    with pytest.raises(UserError, match="seq_len >= 32"):
        mqar_batch(2, 31, 256, 8, gen(0))
    with pytest.raises(UserError, match="vocab_size >= 18"):
        mqar_batch(2, 64, 17, 8, gen(0))
    with pytest.raises(UserError, match="power_a"):
        mqar_batch(2, 64, 64, 4, gen(0), power_a=0.0)
    with pytest.raises(UserError, match="num_kv_pairs"):
        mqar_batch(2, 64, 64, 0, gen(0))
    mqar_batch(2, 32, 18, 8, gen(0))  # the smallest sizes those messages ask for do work
