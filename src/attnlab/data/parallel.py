"""Parallel corpora for translation: readers, the embedded number-translation task, a joint BPE vocabulary,
and token-count batches bucketed by length.

- `read_tsv(path)`: one pair per line, "source<TAB>target".
- `read_aligned(src_path, tgt_path)`: line i of one file translates line i of the other.
- `number_task(cfg)`: number phrases written out by `num2words` in two languages ("three hundred and five" ->
  "trois cent cinq"), generated on the spot, so experiments need no download; the valid and test splits hold
  numbers never seen in training, so a model can only get them right by learning the rules.
- `ParallelVocab`: one byte-level BPE (attnlab.data.tokenizers.BPETokenizer, trained on source and target
  text together, as the paper shares one vocabulary) with PAD, BOS and EOS placed before it.
- `token_batches`: batches of similar length whose padded size stays under a token budget, as the paper
  batches "by approximate sequence length" to ~25k source and ~25k target tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError, require_file
from .tokenizers import BPETokenizer, load_tokenizer

Pair = tuple[str, str]


def read_tsv(path) -> list[Pair]:
    """Pairs from a file of "source<TAB>target" lines; blank lines are skipped."""
    p = require_file(path, "parallel corpus")
    pairs = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise UserError(f"{p}:{i}: expected source<TAB>target (one tab), found {len(parts) - 1} tab(s)")
            src, tgt = parts[0].strip(), parts[1].strip()
            if not src or not tgt:
                raise UserError(f"{p}:{i}: empty {'source' if not src else 'target'}")
            pairs.append((src, tgt))
    if not pairs:
        raise UserError(f"no sentence pairs in {p}")
    return pairs


def read_aligned(src_path, tgt_path) -> list[Pair]:
    """Pairs from two files aligned line by line."""
    ps, pt = require_file(src_path, "source file"), require_file(tgt_path, "target file")
    src = ps.read_text(encoding="utf-8").splitlines()
    tgt = pt.read_text(encoding="utf-8").splitlines()
    if len(src) != len(tgt):
        raise UserError(f"{ps} has {len(src)} lines but {pt} has {len(tgt)}; aligned files must match line for line")
    pairs = []
    for i, (s, t) in enumerate(zip(src, tgt), 1):
        s, t = s.strip(), t.strip()
        if not s and not t:
            continue
        if not s or not t:
            raise UserError(f"line {i}: the {'source' if not s else 'target'} is empty but its translation is not")
        pairs.append((s, t))
    if not pairs:
        raise UserError(f"no sentence pairs in {ps} / {pt}")
    return pairs


# -- the embedded task: numbers written out in words ------------------------------------------------------


@dataclass
class NumberTaskConfig:
    """Numbers drawn without replacement from [low, high]; `src_lang`/`tgt_lang` are num2words language codes,
    or "digits" for the number itself."""

    src_lang: str = "en"
    """source language (num2words code)"""
    tgt_lang: str = "fr"
    """target language (num2words code)"""
    low: int = 0
    """smallest number drawn"""
    high: int = 999_999
    """largest number drawn"""
    n_train: int = 20_000
    """training numbers"""
    n_valid: int = 300
    """validation numbers"""
    n_test: int = 1_000
    """held-out test pairs of a user corpus"""
    seed: int = 0
    """seed of the draw"""


@dataclass
class Splits:
    train: list[Pair]
    valid: list[Pair]
    test: list[Pair]
    numbers: dict[str, list[int]] | None = None
    """which numbers each split holds (the number task)"""


def spell(n: int, lang: str) -> str:
    if lang == "digits":
        return str(n)
    from num2words import num2words

    try:
        return num2words(n, lang=lang)
    except NotImplementedError:
        raise UserError(f"num2words has no language {lang!r} (try en, fr, de, es, it, nl, pt, or digits)") from None


def number_task(cfg: NumberTaskConfig) -> Splits:
    """Train / valid / test pairs over disjoint sets of numbers, determined by cfg.seed."""
    if cfg.src_lang == cfg.tgt_lang:
        raise UserError("the number task needs two different languages")
    if cfg.low < 0 or cfg.high < cfg.low:
        raise UserError(f"number range [{cfg.low}, {cfg.high}] is empty or negative")
    total = cfg.n_train + cfg.n_valid + cfg.n_test
    if min(cfg.n_train, cfg.n_valid, cfg.n_test) < 1 or total > cfg.high - cfg.low + 1:
        raise UserError(f"cannot draw {total} distinct numbers from [{cfg.low}, {cfg.high}] (each split needs one or more)")
    rng = random.Random(cfg.seed)
    drawn = rng.sample(range(cfg.low, cfg.high + 1), total)
    test, valid, train = drawn[:cfg.n_test], drawn[cfg.n_test:cfg.n_test + cfg.n_valid], drawn[cfg.n_test + cfg.n_valid:]
    make = lambda ns: [(spell(n, cfg.src_lang), spell(n, cfg.tgt_lang)) for n in ns]  # noqa: E731
    return Splits(make(train), make(valid), make(test), {"train": train, "valid": valid, "test": test})


def split_pairs(pairs: list[Pair], n_valid: int, n_test: int, seed: int = 0) -> Splits:
    """Random disjoint split of a user's corpus."""
    if n_valid + n_test >= len(pairs):
        raise UserError(f"corpus of {len(pairs)} pairs is too small for {n_valid} valid and {n_test} test pairs")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    take = lambda idx: [pairs[i] for i in idx]  # noqa: E731
    return Splits(take(order[n_valid + n_test:]), take(order[:n_valid]), take(order[n_valid:n_valid + n_test]))


# -- joint vocabulary ---------------------------------------------------------------------------------------

SPECIALS = ("<pad>", "<bos>", "<eos>")
_VOCAB_META = "parallel_vocab.json"


class ParallelVocab:
    """A joint BPE over source and target text, with ids 0, 1, 2 = PAD, BOS, EOS placed before it."""

    pad_id, bos_id, eos_id = 0, 1, 2
    offset = len(SPECIALS)

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, pairs: list[Pair], vocab_size: int = 1024) -> ParallelVocab:
        """vocab_size counts the BPE pieces (at least the 256 bytes); the specials come on top."""
        text = "\n".join(s + "\n" + t for s, t in pairs)
        return cls(BPETokenizer.train(text, vocab_size))

    @property
    def size(self) -> int:
        return self.tokenizer.vocab_size + self.offset

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` followed by EOS."""
        return [i + self.offset for i in self.tokenizer.encode(text)] + [self.eos_id]

    def decode(self, ids) -> str:
        """Detokenised text; special ids are dropped."""
        return self.tokenizer.decode([int(i) - self.offset for i in ids if int(i) >= self.offset])

    def save(self, directory) -> Path:
        d = self.tokenizer.save(directory)
        (d / _VOCAB_META).write_text(json.dumps({"specials": list(SPECIALS)}))
        return d

    @classmethod
    def load(cls, directory) -> ParallelVocab:
        d = Path(directory)
        if not (d / _VOCAB_META).is_file():
            raise UserError(f"no parallel vocabulary in {d} (missing {_VOCAB_META})")
        if json.loads((d / _VOCAB_META).read_text()).get("specials") != list(SPECIALS):
            raise UserError(f"the vocabulary in {d} uses other special tokens than {SPECIALS}")
        return cls(load_tokenizer(d))


# -- batching -----------------------------------------------------------------------------------------------


@dataclass
class EncodedPairs:
    src: list[list[int]]
    """source ids, EOS included"""
    tgt: list[list[int]]
    """target ids, EOS included (no BOS)"""
    dropped: int = 0
    """pairs left out because a side was longer than max_len"""


def encode_pairs(pairs: list[Pair], vocab: ParallelVocab, max_len: int | None = None) -> EncodedPairs:
    src, tgt, dropped = [], [], 0
    for s, t in pairs:
        a, b = vocab.encode(s), vocab.encode(t)
        if max_len is not None and max(len(a), len(b) + 1) > max_len:  # +1: the decoder input starts with BOS
            dropped += 1
            continue
        src.append(a)
        tgt.append(b)
    return EncodedPairs(src, tgt, dropped)


def token_batches(data: EncodedPairs, max_tokens: int, seed: int = 0) -> list[list[int]]:
    """Index batches of similar lengths, each with batch_size · longest side ≤ max_tokens (padding counted).

    Pairs are sorted by (source, target) length after a seeded shuffle, so equal lengths mix at random; the
    batches are cut greedily along that order. The caller shuffles the order of batches every epoch.
    """
    n = len(data.src)
    if n == 0:
        raise UserError("no sentence pairs to batch")
    longest = max(max(len(s), len(t) + 1) for s, t in zip(data.src, data.tgt))
    if longest > max_tokens:
        raise UserError(f"max_tokens={max_tokens} is smaller than the longest pair ({longest} tokens)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: (len(data.src[i]), len(data.tgt[i])))
    batches, cur, width = [], [], 0
    for i in order:
        w = max(width, len(data.src[i]), len(data.tgt[i]) + 1)
        if cur and w * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, w = [], max(len(data.src[i]), len(data.tgt[i]) + 1)
        cur.append(i)
        width = w
    batches.append(cur)
    return batches


def collate(data: EncodedPairs, idx: list[int], pad_id: int, bos_id: int, device=None) -> dict:
    """{"src": [B, S], "tgt_in": [B, T] (BOS + target), "tgt_out": [B, T] (target + EOS)}, right-padded."""
    b = len(idx)
    s_len = max(len(data.src[i]) for i in idx)
    t_len = max(len(data.tgt[i]) for i in idx)
    src = torch.full((b, s_len), pad_id, dtype=torch.long)
    tgt_in = torch.full((b, t_len), pad_id, dtype=torch.long)
    tgt_out = torch.full((b, t_len), pad_id, dtype=torch.long)
    for r, i in enumerate(idx):
        s, t = data.src[i], data.tgt[i]
        src[r, :len(s)] = torch.tensor(s)
        tgt_out[r, :len(t)] = torch.tensor(t)
        tgt_in[r, 0] = bos_id
        tgt_in[r, 1:len(t)] = torch.tensor(t[:-1])
    return {"src": src.to(device), "tgt_in": tgt_in.to(device), "tgt_out": tgt_out.to(device)}


class BatchSchedule:
    """Step -> batch, deterministic: fixed length buckets, their order reshuffled every epoch by (seed, epoch).

    A batch depends only on its index, so a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, data: EncodedPairs, max_tokens: int, seed: int = 0):
        self.data = data
        self.batches = token_batches(data, max_tokens, seed)
        self.seed = seed
        self._epoch, self._order = -1, []

    def __len__(self) -> int:
        return len(self.batches)

    def indices(self, k: int) -> list[int]:
        epoch, j = divmod(k, len(self.batches))
        if epoch != self._epoch:
            self._order = list(range(len(self.batches)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            self._epoch = epoch
        return self.batches[self._order[j]]
