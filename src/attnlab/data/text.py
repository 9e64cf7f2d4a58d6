"""A text corpus tokenised once into a memory-mapped token array, with random and contiguous windows.

The token array is cached on disk under a key made of the sha256 of the text and the tokenizer's
fingerprint, so a second run (or a second process) maps the file instead of tokenising again, and a
changed file or vocabulary never hits a stale cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from attnlab.data.tokenizers import Tokenizer, split_safely
from attnlab.errors import UserError

Split = Literal["train", "val"]
_CACHE_VERSION = 1  # bump when the cache layout or tokenisation procedure changes


def default_cache_dir() -> Path:
    return Path(os.environ.get("ATTNLAB_CACHE") or Path.home() / ".cache" / "attnlab").expanduser()


def _text_files(root: Path) -> list[Path]:
    # Hidden entries (.git, .DS_Store, editor swap files) are never corpus text.
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return sorted((f for f in files if f.is_file()), key=lambda f: f.relative_to(root).parts)


def read_text(path) -> str:
    """The text a corpus at `path` holds: a file, or every regular file under a folder, sorted by path and
    joined with newlines. Use it to train a char or BPE tokenizer on exactly what `TextCorpus` reads."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"text corpus not found: {p}")
    files = _text_files(p) if p.is_dir() else [p]
    parts = []
    for f in files:
        try:
            parts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"not UTF-8 text: {f} (byte {e.start}); remove it or convert it") from None
    text = "\n".join(parts)
    if not text.strip():
        raise UserError(f"text corpus is empty: {p}")
    return text


def _tokenise_to_cache(text: str, tokenizer: Tokenizer, target: Path) -> None:
    pieces = [tokenizer.encode_array(piece) for piece in split_safely(text)]
    tokens = np.concatenate(pieces).astype(tokenizer.dtype, copy=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the same folder, then an atomic rename: a reader never maps a half-written array,
    # and two processes racing to build the same cache both end with a complete file.
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, tokens, allow_pickle=False)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TextCorpus:
    """Tokens of a text file or folder, split into `train` (the first 1 - val_fraction) and `val`."""

    def __init__(self, path, tokenizer: Tokenizer, *, val_fraction: float = 0.1, cache_dir=None):
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.path = Path(path).expanduser()
        self.tokenizer = tokenizer
        self.val_fraction = val_fraction
        text = read_text(self.path)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        key = hashlib.sha256(f"{_CACHE_VERSION}|{digest}|{tokenizer.name}".encode()).hexdigest()[:32]
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.cache_path = cache / "tokens" / f"{key}.npy"
        if not self.cache_path.is_file():
            _tokenise_to_cache(text, tokenizer, self.cache_path)
        del text
        self.tokens = np.load(self.cache_path, mmap_mode="r")
        if len(self.tokens) == 0:
            raise UserError(f"text corpus is empty after tokenisation: {self.path}")
        n_train = int(len(self.tokens) * (1.0 - val_fraction))
        self.train = self.tokens[:n_train]
        self.val = self.tokens[n_train:]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def split(self, split: Split) -> np.ndarray:
        if split == "train":
            return self.train
        if split == "val":
            return self.val
        raise UserError(f"unknown split {split!r}; choose train or val")

    def _checked(self, split: Split, seq_len: int) -> np.ndarray:
        if seq_len < 1:
            raise UserError(f"seq_len must be positive, got {seq_len}")
        data = self.split(split)
        if len(data) < seq_len + 1:
            raise UserError(f"the {split} split of {self.path} has {len(data)} tokens; seq_len {seq_len} needs "
                            f"at least {seq_len + 1} (a window plus its next-token target)")
        return data

    def random_windows(self, split: Split, batch_size: int, seq_len: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` windows at uniform random offsets: x [B, T] and its next tokens y [B, T] (int64).
        The offsets come only from `generator`, so a saved generator state replays the same batches."""
        data = self._checked(split, seq_len)
        if batch_size < 1:
            raise UserError(f"batch_size must be positive, got {batch_size}")
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator).numpy()
        w = torch.from_numpy(data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def num_eval_windows(self, split: Split, seq_len: int) -> int:
        return (len(self._checked(split, seq_len)) - 1) // seq_len

    def eval_windows(self, split: Split, seq_len: int, batch_size: int,
                     max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Contiguous, non-overlapping windows from the start of the split, every token predicted once;
        the last batch may be smaller. At most `max_batches` batches when given."""
        data = self._checked(split, seq_len)
        if batch_size < 1:
            raise UserError(f"batch_size must be positive, got {batch_size}")
        n_windows = (len(data) - 1) // seq_len
        offsets = np.arange(seq_len + 1)
        for b, first in enumerate(range(0, n_windows, batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            starts = np.arange(first, min(first + batch_size, n_windows)) * seq_len
            w = torch.from_numpy(data[starts[:, None] + offsets].astype(np.int64))
            yield w[:, :-1], w[:, 1:]

    def __repr__(self) -> str:
        return (f"TextCorpus({str(self.path)!r}, {self.tokenizer.name}, train={len(self.train)}, "
                f"val={len(self.val)} tokens)")
