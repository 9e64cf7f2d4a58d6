import json

import pytest

from attnlab.data import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    build_tokenizer,
    load_tokenizer,
    split_safely,
)
from attnlab.errors import UserError

UNICODE = "naïve café — Ünïcödé ∑ 漢字 🙂\n\ttabs  and  spaces\r\n"
TRAIN_TEXT = ("The quick brown fox jumps over the lazy dog.\nA lazy dog sleeps; the fox runs.\n" * 40
              + "To be, or not to be, that is the question:\n  Whether 'tis nobler in the mind to suffer\n" * 40)


def test_byte_round_trip_and_ids():
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8"))
    assert len(ids) > len(UNICODE)  # multi-byte characters really are split into bytes
    assert all(0 <= i < 256 for i in ids) and tok.vocab_size == 256
    assert tok.decode(ids) == UNICODE
    assert tok.encode_array(UNICODE).tolist() == ids


def test_byte_decode_replaces_invalid_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("é")[:1] + tok.encode("ok")  # a lone lead byte, as sampling can produce
    assert tok.decode(ids) == "\ufffdok"


def test_char_round_trip_vocab_and_unknown():
    text = "hello world\nhow low"
    tok = build_tokenizer("char", text)
    assert isinstance(tok, CharTokenizer)
    assert tok.chars == sorted(set(text)) and tok.vocab_size == len(set(text))
    ids = tok.encode("world how")
    assert ids == [sorted(set(text)).index(c) for c in "world how"]
    assert tok.decode(ids) == "world how"
    with pytest.raises(UserError, match=r"'z' \(U\+007A\) is not in"):
        tok.encode("hello z")


def test_char_fingerprint_depends_on_vocabulary():
    assert CharTokenizer.train("abc").name == CharTokenizer.train("cba").name
    assert CharTokenizer.train("abc").name != CharTokenizer.train("abd").name


def test_bpe_trains_round_trips_and_compresses():
    tok = build_tokenizer("bpe", TRAIN_TEXT, vocab_size=300)
    assert isinstance(tok, BPETokenizer)
    assert 256 < tok.vocab_size <= 300  # merges were learnt, and no more than asked for
    ids = tok.encode(TRAIN_TEXT)
    assert len(ids) < len(TRAIN_TEXT.encode("utf-8")) / 2
    assert tok.decode(ids) == TRAIN_TEXT
    # Byte-level: text with characters never seen in training still round-trips.
    assert tok.decode(tok.encode(UNICODE)) == UNICODE
    assert all(0 <= i < tok.vocab_size for i in tok.encode(UNICODE))


def test_bpe_save_load_identical(tmp_path):
    tok = build_tokenizer("bpe", TRAIN_TEXT, vocab_size=320)
    tok.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
    loaded = load_tokenizer(tmp_path / "ckpt")
    assert isinstance(loaded, BPETokenizer)
    assert loaded.name == tok.name and loaded.vocab_size == tok.vocab_size
    for text in (TRAIN_TEXT, UNICODE):
        assert loaded.encode(text) == tok.encode(text)


def test_bpe_fingerprint_depends_on_training():
    a = build_tokenizer("bpe", TRAIN_TEXT, vocab_size=300)
    b = build_tokenizer("bpe", TRAIN_TEXT, vocab_size=280)
    assert a.name != b.name


@pytest.mark.parametrize("kind", ["byte", "char"])
def test_save_load_round_trip(tmp_path, kind):
    tok = build_tokenizer(kind, TRAIN_TEXT)
    tok.save(tmp_path)
    meta = json.loads((tmp_path / "tokenizer_meta.json").read_text(encoding="utf-8"))
    assert meta["kind"] == kind and meta["name"] == tok.name
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is type(tok) and loaded.name == tok.name
    assert loaded.encode(TRAIN_TEXT) == tok.encode(TRAIN_TEXT)


def test_build_and_load_errors(tmp_path):
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        build_tokenizer("wordpiece", "abc")
    with pytest.raises(UserError, match="non-empty"):
        build_tokenizer("char", None)
    with pytest.raises(UserError, match="at least 256"):
        build_tokenizer("bpe", TRAIN_TEXT, vocab_size=100)
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "nowhere")
    tok = CharTokenizer.train("abc")
    tok.save(tmp_path)
    meta = json.loads((tmp_path / "tokenizer_meta.json").read_text(encoding="utf-8"))
    meta["chars"] = "abd"
    (tmp_path / "tokenizer_meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(UserError, match="fingerprint"):
        load_tokenizer(tmp_path)


def test_split_safely_keeps_bpe_encoding():
    # Whitespace runs around newlines, CRLF and blank lines are where a careless cut changes BPE tokens.
    text = ("word  \nnext\r\nline\n\n  indented\n\tx\nplain\ny" * 30) + "tail"
    pieces = list(split_safely(text, max_chars=16))
    assert "".join(pieces) == text
    assert len(pieces) > 20
    # Trained on this text, BPE merges its whitespace runs, so a cut inside one would change the ids.
    tok = build_tokenizer("bpe", text, vocab_size=300)
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)


def test_split_safely_without_cut_point_keeps_text_whole():
    assert list(split_safely("x" * 100, max_chars=10)) == ["x" * 100]
    assert list(split_safely("", max_chars=10)) == []
