import pytest
import torch

from attnlab.data.parallel import (
    BatchSchedule, EncodedPairs, NumberTaskConfig, ParallelVocab, collate, encode_pairs, number_task,
    read_aligned, read_tsv, split_pairs, token_batches,
)
from attnlab.errors import UserError


def test_read_tsv_and_its_errors(tmp_path):
    p = tmp_path / "c.tsv"
    p.write_text("one\tun\n\ntwo words\tdeux mots\r\n", encoding="utf-8")
    assert read_tsv(p) == [("one", "un"), ("two words", "deux mots")]
    p.write_text("one\tun\ntwo deux\n")
    with pytest.raises(UserError, match=r"c.tsv:2: expected source<TAB>target"):
        read_tsv(p)
    p.write_text("one\t \n")
    with pytest.raises(UserError, match="empty target"):
        read_tsv(p)
    with pytest.raises(UserError, match="not found"):
        read_tsv(tmp_path / "nope.tsv")


def test_read_aligned_files(tmp_path):
    s, t = tmp_path / "s.txt", tmp_path / "t.txt"
    s.write_text("a\nb\n")
    t.write_text("x\ny\n")
    assert read_aligned(s, t) == [("a", "x"), ("b", "y")]
    t.write_text("x\n")
    with pytest.raises(UserError, match="2 lines but .* has 1"):
        read_aligned(s, t)


def test_number_task_splits_are_disjoint_and_deterministic():
    cfg = NumberTaskConfig(high=5000, n_train=300, n_valid=50, n_test=100, seed=3)
    a, b = number_task(cfg), number_task(cfg)
    assert a.train == b.train and a.test == b.test
    nums = a.numbers
    assert len(nums["train"]) == 300 and len(nums["test"]) == 100
    assert not set(nums["test"]) & set(nums["train"]) and not set(nums["valid"]) & set(nums["train"])
    assert not set(nums["test"]) & set(nums["valid"])
    from num2words import num2words

    n = nums["test"][0]
    assert a.test[0] == (num2words(n, lang="en"), num2words(n, lang="fr"))
    assert number_task(NumberTaskConfig(high=5000, n_train=300, n_valid=50, n_test=100, seed=4)).test != a.test
    digits = number_task(NumberTaskConfig(src_lang="digits", tgt_lang="de", high=99, n_train=5, n_valid=1, n_test=1))
    assert digits.train[0][0] == str(digits.numbers["train"][0])


def test_number_task_refuses_impossible_requests():
    with pytest.raises(UserError, match="distinct numbers"):
        number_task(NumberTaskConfig(high=10, n_train=10, n_valid=1, n_test=1))
    with pytest.raises(UserError, match="no language"):
        number_task(NumberTaskConfig(tgt_lang="xx", high=100, n_train=5, n_valid=1, n_test=1))
    with pytest.raises(UserError, match="too small"):
        split_pairs([("a", "b")] * 3, 2, 1)


def test_joint_vocab_round_trips_both_languages(tmp_path):
    pairs = [("ninety-one", "quatre-vingt-onze"), ("zero", "zéro"), ("one hundred and five", "cent cinq")] * 5
    vocab = ParallelVocab.train(pairs, vocab_size=300)
    for s, t in pairs[:3]:
        for text in (s, t):
            ids = vocab.encode(text)
            assert ids[-1] == vocab.eos_id and min(ids[:-1]) >= vocab.offset
            assert vocab.decode(ids) == text
    # One vocabulary for both sides: a piece learnt from French serves the same id on either side.
    assert vocab.encode("cent") == vocab.encode("cent")
    assert vocab.decode([vocab.bos_id] + vocab.encode("zéro") + [vocab.pad_id]) == "zéro"
    again = ParallelVocab.load(vocab.save(tmp_path / "v"))
    assert again.encode("quatre-vingt-onze") == vocab.encode("quatre-vingt-onze") and again.size == vocab.size


def lengths_data():
    torch.manual_seed(0)
    src = [[5] * int(n) + [2] for n in torch.randint(1, 30, (200,))]
    tgt = [[6] * int(n) + [2] for n in torch.randint(1, 30, (200,))]
    return EncodedPairs(src, tgt)


def test_token_batches_respect_the_budget_and_cover_every_pair_once():
    data = lengths_data()
    batches = token_batches(data, max_tokens=128, seed=1)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(200))
    for b in batches:
        width = max(max(len(data.src[i]), len(data.tgt[i]) + 1) for i in b)
        assert width * len(b) <= 128
    # Bucketing: batches are far less padded than random ones of the same sizes would be.
    def pad_frac(bs):
        real = sum(len(data.src[i]) for b in bs for i in b)
        return 1 - real / sum(max(len(data.src[i]) for i in b) * len(b) for b in bs)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(200, generator=g).tolist()
    random_bs, k = [], 0
    for b in batches:
        random_bs.append(perm[k:k + len(b)])
        k += len(b)
    assert pad_frac(batches) < 0.5 * pad_frac(random_bs)
    with pytest.raises(UserError, match="smaller than the longest"):
        token_batches(data, max_tokens=10)


def test_collate_shifts_the_target_behind_bos():
    data = EncodedPairs([[5, 6, 2], [7, 2]], [[8, 9, 10, 2], [11, 2]])
    b = collate(data, [0, 1], pad_id=0, bos_id=1)
    assert b["src"].tolist() == [[5, 6, 2], [7, 2, 0]]
    assert b["tgt_in"].tolist() == [[1, 8, 9, 10], [1, 11, 0, 0]]
    assert b["tgt_out"].tolist() == [[8, 9, 10, 2], [11, 2, 0, 0]]


def test_batch_schedule_is_a_deterministic_epoch_permutation():
    data = lengths_data()
    a, b = BatchSchedule(data, 128, seed=2), BatchSchedule(data, 128, seed=2)
    n = len(a)
    epoch0 = [tuple(a.indices(k)) for k in range(n)]
    assert sorted(epoch0) == sorted(tuple(x) for x in a.batches)
    epoch1 = [tuple(a.indices(k)) for k in range(n, 2 * n)]
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)
    assert [tuple(b.indices(k)) for k in (n + 3, 2, n + 3)] == [epoch1[3], epoch0[2], epoch1[3]]


def test_encode_pairs_drops_overlong_pairs():
    vocab = ParallelVocab.train([("a b c", "x y z")] * 3, vocab_size=260)
    out = encode_pairs([("a", "x"), ("a b c a b c a b c", "x")], vocab, max_len=6)
    assert out.dropped == 1 and len(out.src) == 1
