"""Tokenizers behind one small interface: bytes (default), characters, byte-level BPE, and a pretrained
model's tokenizer (`hf`: a transformers fast tokenizer's `tokenizer.json`, as a student distilled from a
transformers teacher takes it).

Each tokenizer saves itself into a directory (`tokenizer_meta.json`, plus `tokenizer.json` for BPE) so a
checkpoint directory can carry the tokenizer its model was trained with; `load_tokenizer` reads it back.
`name` is a fingerprint of everything that decides the ids, so corpora cached under it are never reused
with a different vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from attnlab.errors import UserError

META_FILE = "tokenizer_meta.json"
HF_FILE = "tokenizer.json"
_FORMAT = 1


def _digest(data: str) -> str:
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:16]


def split_safely(text: str, max_chars: int = 1 << 20) -> Iterator[str]:
    """Cut `text` into pieces of about `max_chars` whose separate encodings concatenate to the encoding of
    the whole, so large corpora can be tokenised piece by piece.

    A cut goes right after a lone newline between two non-space characters. Bytes and characters are
    indifferent to cuts; the byte-level pre-tokenizer makes such a newline a pre-token of its own whether
    or not the text ends there (a longer whitespace run would be split differently at the end of a piece),
    and BPE never merges across pre-tokens. A text with no such newline is left whole.
    """
    start, n = 0, len(text)
    while n - start > max_chars:
        cut = max(start + max_chars, 1)
        while True:
            nl = text.find("\n", cut, n - 1)
            if nl < 0:
                yield text[start:]
                return
            if not text[nl - 1].isspace() and not text[nl + 1].isspace():
                break
            cut = nl + 1
        yield text[start:nl + 1]
        start = nl + 1
    if start < n:
        yield text[start:]


class Tokenizer(ABC):
    kind: str

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def name(self) -> str:
        """Fingerprint of the vocabulary: equal names give equal ids for every text."""

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids) -> str: ...

    def encode_array(self, text: str) -> np.ndarray:
        """Ids as a compact numpy array (uint16 when the vocabulary fits)."""
        return np.asarray(self.encode(text), dtype=self.dtype)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)

    def _meta(self) -> dict:
        return {}

    def save(self, directory) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"format": _FORMAT, "kind": self.kind, "name": self.name, "vocab_size": self.vocab_size,
                **self._meta()}
        (d / META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
        return d

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, name={self.name!r})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255: nothing to train, never an unknown symbol."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def name(self) -> str:
        return "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        # Sampled ids need not form valid UTF-8; show the damage rather than fail mid-generation.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class CharTokenizer(Tokenizer):
    """One id per character of the training text, in sorted order."""

    kind = "char"

    def __init__(self, chars):
        chars = sorted(set(chars))
        if not chars:
            raise UserError("char tokenizer needs a non-empty training text")
        if any(len(c) != 1 for c in chars):
            raise UserError("char tokenizer vocabulary must hold single characters")
        self.chars = chars
        self._index = {c: i for i, c in enumerate(chars)}
        self._name = f"char-{len(chars)}-{_digest(''.join(chars))}"

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls(set(text))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def name(self) -> str:
        return self._name

    def encode(self, text: str) -> list[int]:
        index = self._index
        try:
            return [index[c] for c in text]
        except KeyError as e:
            c = e.args[0]
            raise UserError(f"character {c!r} (U+{ord(c):04X}) is not in the char tokenizer's vocabulary of "
                            f"{self.vocab_size} characters; train it on text that contains it, or use the byte "
                            f"tokenizer") from None

    def decode(self, ids) -> str:
        chars = self.chars
        return "".join(chars[int(i)] for i in ids)

    def _meta(self) -> dict:
        return {"chars": "".join(self.chars)}


class BPETokenizer(Tokenizer):
    """Byte-level BPE trained with HF `tokenizers`: every byte is in the alphabet, so no text is unknown."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        self._name = f"bpe-{self.vocab_size}-{_digest(hf_tokenizer.to_str())}"

    @classmethod
    def train(cls, text: str, vocab_size: int = 1024) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet):
            raise UserError(f"bpe vocab_size must be at least {len(alphabet)} (the byte alphabet), "
                            f"got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        # No prefix space: pieces of a long text must encode exactly as the whole (see split_safely).
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, special_tokens=[],
                                      show_progress=False)
        tok.train_from_iterator(split_safely(text), trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def name(self) -> str:
        return self._name

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def save(self, directory) -> Path:
        d = super().save(directory)
        self._tok.save(str(d / HF_FILE))
        return d


class PretrainedTokenizer(Tokenizer):
    """A pretrained model's tokenizer (the `tokenizers` object behind a transformers fast tokenizer), without
    the special tokens its post-processor would add. `vocab_size` is the model's output width: larger than the
    tokenizer where the model pads its output layer, smaller where transformers added special tokens the model
    has no row for (then a text that spells one out is refused)."""

    kind = "hf"

    def __init__(self, hf_tokenizer, vocab_size: int | None = None):
        base = hf_tokenizer.get_vocab_size(with_added_tokens=False)
        self._own = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab_size is not None and vocab_size < base:
            raise UserError(f"a model with {vocab_size} output tokens cannot use a tokenizer of {base} tokens")
        self._tok, self._size = hf_tokenizer, vocab_size or self._own
        self._name = f"hf-{self._size}-{_digest(hf_tokenizer.to_str())}"

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def name(self) -> str:
        return self._name

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self._own > self._size and ids and max(ids) >= self._size:
            bad = next(i for i in ids if i >= self._size)
            raise UserError(f"the text spells out the special token {self._tok.id_to_token(bad)!r} (id {bad}), "
                            f"which the model's {self._size} output tokens do not include")
        return ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory) -> Path:
        d = super().save(directory)
        self._tok.save(str(d / HF_FILE))
        return d


def build_tokenizer(kind: Literal["byte", "char", "bpe"], text: str | None = None,
                    vocab_size: int = 1024) -> Tokenizer:
    """A ready tokenizer; `char` and `bpe` are trained on `text`, `byte` ignores it."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        raise UserError("the hf tokenizer is a pretrained model's: it comes with a run distilled from a "
                        "transformers teacher (attnlab distill --teacher_hf), kept in its run folder")
    if kind not in ("char", "bpe"):
        raise UserError(f"unknown tokenizer kind {kind!r}; choose one of byte, char, bpe")
    if not text:
        raise UserError(f"the {kind} tokenizer must be trained on a non-empty text")
    if kind == "char":
        return CharTokenizer.train(text)
    return BPETokenizer.train(text, vocab_size)


def _int(value, where) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"unreadable tokenizer file {where}: vocab_size must be a positive integer")
    return value


def load_tokenizer(directory) -> Tokenizer:
    """Read back a tokenizer written by `Tokenizer.save`."""
    d = Path(directory).expanduser()
    meta_path = d / META_FILE
    if not meta_path.is_file():
        raise UserError(f"tokenizer not found: {meta_path}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        kind = meta["kind"]
    except (ValueError, KeyError) as e:
        raise UserError(f"unreadable tokenizer file {meta_path}: {e}") from None
    if kind == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif kind == "char":
        if not isinstance(meta.get("chars"), str):
            raise UserError(f"unreadable tokenizer file {meta_path}: no character list")
        tok = CharTokenizer(meta["chars"])
    elif kind in ("bpe", "hf"):
        from tokenizers import Tokenizer as HFTokenizer

        hf_path = d / HF_FILE
        if not hf_path.is_file():
            raise UserError(f"tokenizer not found: {hf_path}")
        hf = HFTokenizer.from_file(str(hf_path))
        tok = BPETokenizer(hf) if kind == "bpe" else PretrainedTokenizer(hf, _int(meta.get("vocab_size"), meta_path))
    else:
        raise UserError(f"unknown tokenizer kind {kind!r} in {meta_path}")
    if meta.get("name") not in (None, tok.name):
        raise UserError(f"tokenizer in {d} does not match its fingerprint ({tok.name} != {meta['name']}); "
                        f"the files were changed or mixed")
    return tok
