"""LSTM baselines: a language model, and a sequence-to-sequence model with attention (Luong et al. 2015).

They are the "recurrent" row of Table 1 in "Attention Is All You Need": O(n·d²) work per layer, but O(n)
sequential operations, since step t needs the state of step t-1. `match_lstm_width` picks the hidden size at
which an LSTM has as many parameters as a given Transformer, so speed comparisons are at equal parameters.

The seq2seq model follows Luong's global attention with input feeding: a bidirectional LSTM encoder, a
unidirectional LSTM decoder whose input at step t is [embedding(y_{t-1}); h̃_{t-1}], "general" scores
h_t·W·h_s over the source, attentional state h̃_t = tanh(W_c [c_t; h_t]), output logits h̃_t·Eᵀ with the
embedding shared across source, target and output as in the Transformer. It implements the decoding protocol
of `attnlab.inference.beam` (start / step / reorder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..checks import fraction, positive, require
from ..errors import UserError


@dataclass
class LSTMLMConfig:
    vocab_size: int = 256
    d_model: int = 256
    """embedding and hidden width (equal, so the output projection can share the embedding)"""
    n_layer: int = 2
    dropout: float = 0.0
    tie_embeddings: bool = True

    def __post_init__(self):
        positive(self, "lstm", "vocab_size", "d_model", "n_layer")
        fraction(self, "lstm", "dropout")


class LSTMLM(nn.Module):
    """Embedding -> stacked LSTM -> (tied) output projection; same call signature as `models.lm.LM`."""

    def __init__(self, cfg: LSTMLMConfig):
        super().__init__()
        if cfg.vocab_size < 1 or cfg.n_layer < 1 or cfg.d_model < 1:
            raise UserError("vocab_size, d_model and n_layer must be positive")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.lstm = nn.LSTM(cfg.d_model, cfg.d_model, cfg.n_layer, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, 0.0, 0.02)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, 0.0, 0.02)

    def forward(self, idx, targets=None, *, state=None, loss_mask=None):
        """idx [B, N] -> logits [B, N, V] (or (logits, loss)); `state` continues from an earlier call."""
        x = self.drop(self.embed(idx))
        h, _ = self.lstm(x, state)
        logits = self.head(self.drop(h))
        if targets is None:
            return logits
        if loss_mask is not None:
            targets = targets.masked_fill(~loss_mask, -100)
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def match_lstm_width(target_params: int, build: Callable[[int], nn.Module], multiple: int = 8,
                     lo: int = 8, hi: int = 8192) -> int:
    """The width (a multiple of `multiple`) whose model `build(width)` has the parameter count closest to
    `target_params`. Models are built on the meta device, so the search allocates nothing."""
    def count(w):
        with torch.device("meta"):
            return sum(p.numel() for p in build(w).parameters())

    lo_, hi_ = lo // multiple, hi // multiple
    if count(lo_ * multiple) > target_params:
        return lo_ * multiple
    while hi_ - lo_ > 1:  # parameter count grows with width: bisect
        mid = (lo_ + hi_) // 2
        if count(mid * multiple) <= target_params:
            lo_ = mid
        else:
            hi_ = mid
    a, b = lo_ * multiple, hi_ * multiple
    return a if abs(count(a) - target_params) <= abs(count(b) - target_params) else b


@dataclass
class LSTMSeq2SeqConfig:
    vocab_size: int = 1000
    d_model: int = 256
    """embedding, encoder output (both directions together) and decoder width"""
    n_layer: int = 2
    """encoder and decoder layers each"""
    dropout: float = 0.1
    max_seq_len: int = 256
    """longest target decoded (the recurrence itself has no limit)"""
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        positive(self, "lstm", "d_model", "n_layer", "max_seq_len")
        fraction(self, "lstm", "dropout")
        require(self.d_model % 2 == 0,
                f"lstm.d_model must be even (the encoder has two directions of d_model/2), got {self.d_model}")
        ids = (self.pad_id, self.bos_id, self.eos_id)
        require(len(set(ids)) == 3 and min(ids) >= 0 and max(ids) < self.vocab_size,
                f"lstm.pad_id, bos_id and eos_id must be distinct ids in [0, vocab_size={self.vocab_size}), got {ids}")


@dataclass
class LSTMDecodeState:
    memory: torch.Tensor
    """[B, S, d] encoder outputs"""
    keys: torch.Tensor
    """[B, S, d] W·h_s, computed once"""
    src_valid: torch.Tensor
    """[B, S]"""
    h: torch.Tensor
    """[L, B, d]"""
    c: torch.Tensor
    """[L, B, d]"""
    feed: torch.Tensor
    """[B, d] the previous attentional state h̃"""


class LSTMSeq2Seq(nn.Module):
    def __init__(self, cfg: LSTMSeq2SeqConfig):
        super().__init__()
        if cfg.d_model % 2:
            raise UserError(f"d_model must be even (the encoder has two directions of d_model/2), got {cfg.d_model}")
        if cfg.vocab_size < 3 or cfg.n_layer < 1:
            raise UserError("vocab_size must be at least 3 and n_layer at least 1")
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.encoder = nn.LSTM(d, d // 2, cfg.n_layer, batch_first=True, bidirectional=True,
                               dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.decoder = nn.LSTM(2 * d, d, cfg.n_layer, batch_first=True, dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.score = nn.Linear(d, d, bias=False)  # Luong's "general" score h_t·W·h_s
        self.combine = nn.Linear(2 * d, d, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.embed.weight, 0.0, d ** -0.5)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def max_decode_len(self) -> int:
        return self.cfg.max_seq_len

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = src != self.cfg.pad_id
        lengths = valid.sum(dim=1)
        if bool((lengths == 0).any()):
            raise UserError("a source sequence is empty")
        # Packing keeps the backward direction from reading the padding first.
        packed = pack_padded_sequence(self.drop(self.embed(src)), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.encoder(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        return memory, valid

    def start(self, src: torch.Tensor) -> LSTMDecodeState:
        memory, valid = self.encode(src)
        b, d, n = src.shape[0], self.cfg.d_model, self.cfg.n_layer
        zeros = memory.new_zeros(n, b, d)
        return LSTMDecodeState(memory, self.score(memory), valid, zeros, zeros.clone(), memory.new_zeros(b, d))

    def step(self, state: LSTMDecodeState, tokens: torch.Tensor) -> tuple[torch.Tensor, LSTMDecodeState]:
        x = torch.cat([self.drop(self.embed(tokens)), state.feed], dim=-1)[:, None]
        out, (h, c) = self.decoder(x, (state.h, state.c))
        top = out[:, 0]  # [B, d]
        scores = torch.einsum("bd,bsd->bs", top, state.keys).masked_fill(~state.src_valid, float("-inf"))
        ctx = torch.einsum("bs,bsd->bd", scores.softmax(dim=-1), state.memory)
        feed = torch.tanh(self.combine(torch.cat([ctx, top], dim=-1)))
        logits = F.linear(self.drop(feed), self.embed.weight)
        return logits, LSTMDecodeState(state.memory, state.keys, state.src_valid, h, c, feed)

    def reorder(self, state: LSTMDecodeState, index: torch.Tensor) -> LSTMDecodeState:
        return LSTMDecodeState(state.memory.index_select(0, index), state.keys.index_select(0, index),
                               state.src_valid.index_select(0, index), state.h.index_select(1, index),
                               state.c.index_select(1, index), state.feed.index_select(0, index))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, T, V]. Input feeding makes each step depend on the previous one's output,
        so the decoder runs one step at a time: the O(n) sequential operations of Table 1."""
        state = self.start(src)
        logits = []
        for t in range(tgt_in.shape[1]):
            step_logits, state = self.step(state, tgt_in[:, t])
            logits.append(step_logits)
        return torch.stack(logits, dim=1)
