"""Data: tokenizers, memory-mapped text corpora, synthetic recall tasks."""

from attnlab.data.synthetic import FILLER, induction_batch, mqar_batch, mqar_gap_probs
from attnlab.data.text import TextCorpus, default_cache_dir, read_text
from attnlab.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    split_safely,
)

__all__ = [
    "FILLER", "induction_batch", "mqar_batch", "mqar_gap_probs",
    "TextCorpus", "default_cache_dir", "read_text",
    "BPETokenizer", "ByteTokenizer", "CharTokenizer", "Tokenizer", "build_tokenizer", "load_tokenizer",
    "split_safely",
]
