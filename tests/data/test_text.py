
import numpy as np
import pytest
import torch

from attnlab.data import ByteTokenizer, CharTokenizer, TextCorpus, read_text
from attnlab.errors import UserError


def _write_text(path, n_lines=300, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "délta", "ε", "zeta", "eta", "théta"]
    text = "\n".join(" ".join(rng.choice(words, size=6)) for _ in range(n_lines)) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    return path, _write_text(path)


def test_tokens_and_split_sizes(corpus_file, tmp_path):
    path, text = corpus_file
    corpus = TextCorpus(path, ByteTokenizer(), val_fraction=0.2, cache_dir=tmp_path / "cache")
    expected = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    n = len(expected)
    assert corpus.tokens.dtype == np.uint16 and isinstance(corpus.tokens, np.memmap)
    assert len(corpus.train) == int(n * 0.8) and len(corpus.val) == n - int(n * 0.8)
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.val]), expected)
    assert corpus.vocab_size == 256


def test_cache_hit_does_not_retokenize(corpus_file, tmp_path, monkeypatch):
    path, _ = corpus_file
    first = TextCorpus(path, ByteTokenizer(), cache_dir=tmp_path / "cache")
    mtime = first.cache_path.stat().st_mtime_ns

    def boom(self, text):
        raise AssertionError("tokenised again despite a cache")

    monkeypatch.setattr(ByteTokenizer, "encode_array", boom)
    monkeypatch.setattr(ByteTokenizer, "encode", boom)
    second = TextCorpus(path, ByteTokenizer(), cache_dir=tmp_path / "cache")
    assert second.cache_path == first.cache_path
    assert second.cache_path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second.tokens, first.tokens)
    # Written atomically: only the finished array is left in the cache folder.
    assert [p.name for p in first.cache_path.parent.iterdir()] == [first.cache_path.name]


def test_cache_key_follows_content_and_tokenizer(corpus_file, tmp_path):
    path, text = corpus_file
    cache = tmp_path / "cache"
    a = TextCorpus(path, ByteTokenizer(), cache_dir=cache)
    path.write_text(text.replace("alpha", "omega"), encoding="utf-8")
    b = TextCorpus(path, ByteTokenizer(), cache_dir=cache)
    assert b.cache_path != a.cache_path
    assert bytes(np.concatenate([b.train, b.val]).astype(np.uint8)).decode() == text.replace("alpha", "omega")
    c = TextCorpus(path, CharTokenizer.train(read_text(path)), cache_dir=cache)
    assert c.cache_path not in (a.cache_path, b.cache_path)
    assert c.tokenizer.decode(np.concatenate([c.train, c.val])) == read_text(path)


def test_default_cache_dir_from_env(corpus_file, tmp_path, monkeypatch):
    path, _ = corpus_file
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "envcache"))
    corpus = TextCorpus(path, ByteTokenizer())
    assert corpus.cache_path.is_relative_to(tmp_path / "envcache")


def test_folder_is_sorted_recursive_concatenation(tmp_path):
    root = tmp_path / "docs"
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text("first", encoding="utf-8")
    (root / "b" / "c.txt").write_text("second", encoding="utf-8")
    (root / "c.md").write_text("third", encoding="utf-8")
    (root / ".hidden").write_text("never", encoding="utf-8")
    assert read_text(root) == "first\nsecond\nthird"
    corpus = TextCorpus(root, ByteTokenizer(), val_fraction=0.0, cache_dir=tmp_path / "cache")
    assert bytes(corpus.train.astype(np.uint8)).decode() == "first\nsecond\nthird"
    assert len(corpus.val) == 0


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(UserError, match="not found: .*nope.txt"):
        TextCorpus(tmp_path / "nope.txt", ByteTokenizer(), cache_dir=tmp_path)
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        TextCorpus(tmp_path / "empty.txt", ByteTokenizer(), cache_dir=tmp_path)
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="empty"):
        TextCorpus(tmp_path / "folder", ByteTokenizer(), cache_dir=tmp_path)
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(UserError, match="not UTF-8"):
        TextCorpus(tmp_path / "binary.bin", ByteTokenizer(), cache_dir=tmp_path)


def test_bad_arguments(corpus_file, tmp_path):
    path, _ = corpus_file
    with pytest.raises(UserError, match="val_fraction"):
        TextCorpus(path, ByteTokenizer(), val_fraction=1.0, cache_dir=tmp_path)
    corpus = TextCorpus(path, ByteTokenizer(), cache_dir=tmp_path)
    with pytest.raises(UserError, match="unknown split"):
        corpus.random_windows("test", 2, 8, torch.Generator().manual_seed(0))


def test_too_short_split_says_how_many_tokens(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 100, encoding="utf-8")
    corpus = TextCorpus(path, ByteTokenizer(), val_fraction=0.1, cache_dir=tmp_path)
    with pytest.raises(UserError, match=r"val split .* has 10 tokens; seq_len 16"):
        corpus.random_windows("val", 2, 16, torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="has 10 tokens"):
        next(corpus.eval_windows("val", 10, 4))
    x, y = corpus.random_windows("val", 2, 9, torch.Generator().manual_seed(0))  # 10 tokens suffice for 9
    assert x.shape == (2, 9)


def test_random_windows(corpus_file, tmp_path):
    path, _ = corpus_file
    corpus = TextCorpus(path, ByteTokenizer(), cache_dir=tmp_path)
    B, T = 16, 24
    x, y = corpus.random_windows("train", B, T, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Every window is a real stretch of the train split.
    stretches = np.lib.stride_tricks.sliding_window_view(np.asarray(corpus.train), T + 1)
    starts = []
    for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
        hits = np.flatnonzero((stretches == row).all(axis=1))
        assert len(hits) > 0
        starts.append(hits[0])
    assert len(set(starts)) > B // 2  # offsets are spread, not one window repeated
    x2, y2 = corpus.random_windows("train", B, T, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = corpus.random_windows("train", B, T, torch.Generator().manual_seed(2))
    assert not torch.equal(x, x3)


def test_random_windows_reach_both_ends(tmp_path):
    # Tokens 0..n-1 in order (a char tokenizer over distinct characters) make offsets readable.
    text = "".join(chr(0x100 + i) for i in range(40))
    path = tmp_path / "ramp.txt"
    path.write_text(text, encoding="utf-8")
    corpus = TextCorpus(path, CharTokenizer.train(text), val_fraction=0.0, cache_dir=tmp_path)
    x, y = corpus.random_windows("train", 2000, 5, torch.Generator().manual_seed(0))
    assert torch.equal(x, x[:, :1] + torch.arange(5)) and torch.equal(y, x + 1)
    assert x[:, 0].min() == 0 and y[:, -1].max() == 39  # first and last token both reachable


def test_eval_windows_contiguous_non_overlapping(corpus_file, tmp_path):
    path, _ = corpus_file
    corpus = TextCorpus(path, ByteTokenizer(), val_fraction=0.25, cache_dir=tmp_path)
    T, B = 32, 5
    batches = list(corpus.eval_windows("val", T, B))
    n_windows = (len(corpus.val) - 1) // T
    assert corpus.num_eval_windows("val", T) == n_windows
    assert [len(x) for x, _ in batches] == [B] * (n_windows // B) + ([n_windows % B] if n_windows % B else [])
    xs = torch.cat([x for x, _ in batches]).flatten()
    ys = torch.cat([y for _, y in batches]).flatten()
    val = torch.from_numpy(np.asarray(corpus.val).astype(np.int64))
    # Concatenated inputs are the split itself, in order: contiguous, each token predicted exactly once.
    assert torch.equal(xs, val[:n_windows * T]) and torch.equal(ys, val[1:n_windows * T + 1])
    assert len(list(corpus.eval_windows("val", T, B, max_batches=2))) == 2
