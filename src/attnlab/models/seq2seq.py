"""The encoder-decoder Transformer of "Attention Is All You Need", with attention from the registry.

Paper defaults: post-LN residual blocks LayerNorm(x + Dropout(Sublayer(x))), ReLU feed-forward, sinusoidal
positions, one embedding matrix shared by source, target and the pre-softmax projection, scaled by √d_model.
`norm_position="pre"` gives the pre-LN variant (x + Dropout(Sublayer(LN(x))), final LayerNorms), which trains
without warmup tricks.

Attention: `cfg.attention` (an AttentionSpec) runs in the stacks named by `attention_in` (encoder self-attention,
decoder self-attention, cross-attention), in the layers its `layers` selection names; exact attention runs
everywhere else. The registry refuses a mechanism whose declared capabilities do not fit a stack, with one line.

Decoding protocol (used by `attnlab.inference.beam` for greedy and beam search):
    state = model.start(src)                    # encode once
    logits, state = model.step(state, tokens)   # tokens [B]: the last token of each hypothesis -> [B, V]
    state = model.reorder(state, index)         # keep / duplicate hypotheses (beam search)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionSpec, LayerCache, MultiHeadAttention
from ..attention.positions import sinusoidal_table
from ..attention.registry import kernel_entry, select_layers
from ..checks import fraction, literals, positive, require
from ..errors import UserError
from .blocks import MLP, make_norm
from .lm import build_attention_layers, check_attention_spec, check_heads

STACKS = ("encoder", "decoder", "cross")


@dataclass
class Seq2SeqConfig:
    vocab_size: int = 1000  # joint source/target vocabulary, special tokens included
    """vocabulary size (set from the trained vocabulary)"""
    n_layer: int = 6  # encoder layers
    """number of Transformer layers"""
    n_dec_layer: int | None = None  # decoder layers (default: n_layer)
    """decoder layers (0: as many as n_layer)"""
    n_head: int = 8
    """attention heads per layer"""
    n_kv_head: int | None = None
    """key/value heads (fewer than n_head: grouped-query attention; null: n_head)"""
    d_model: int = 512
    """model width"""
    d_ff: int | None = None  # default 4·d_model
    """hidden width of the MLP (null: the default for the MLP type)"""
    activation: Literal["relu", "gelu"] = "relu"
    """MLP activation"""
    norm_position: Literal["post", "pre"] = "post"
    """pre- or post-norm residual blocks"""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """normalisation layer"""
    max_seq_len: int = 256  # longest source and longest target (positions table)
    """longest sequence the model accepts"""
    dropout: float = 0.1
    """dropout rate"""
    bias: bool = True
    """biases in linear layers and norms"""
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    attention_in: list[str] = field(default_factory=lambda: list(STACKS))
    """where the mechanism runs"""
    pad_id: int = 0
    """padding id (set from the vocabulary)"""
    bos_id: int = 1
    """beginning-of-sentence id (set from the vocabulary)"""
    eos_id: int = 2
    """end-of-sentence id (set from the vocabulary)"""

    def __post_init__(self):
        p = "model"
        positive(self, p, "n_layer", "n_head", "d_model", "max_seq_len")
        positive(self, p, "n_dec_layer", "n_kv_head", "d_ff", optional=True)
        require(self.vocab_size >= 3, f"{p}.vocab_size must be at least 3 (pad, bos, eos), got {self.vocab_size}")
        fraction(self, p, "dropout")
        literals(self, p)
        check_heads(self, p)
        require(self.d_model % 2 == 0, f"{p}.d_model must be even for sinusoidal positions, got {self.d_model}")
        bad = sorted(set(self.attention_in) - set(STACKS))
        require(not bad, f"{p}.attention_in names {bad}; choose among {', '.join(STACKS)}")
        ids = (self.pad_id, self.bos_id, self.eos_id)
        require(len(set(ids)) == 3 and min(ids) >= 0 and max(ids) < self.vocab_size,
                f"{p}.pad_id, bos_id and eos_id must be distinct ids in [0, vocab_size={self.vocab_size}), got {ids}")
        n_dec = self.n_dec_layer or self.n_layer
        layers = {"encoder": self.n_layer, "decoder": n_dec, "cross": n_dec}
        needs = {"encoder": {"noncausal": True, "mask": True}, "decoder": {"causal": True},
                 "cross": {"noncausal": True, "mask": True, "kv_cache": True}}
        check_attention_spec(self.attention, f"{p}.attention",
                             {s: (layers[s], needs[s]) for s in STACKS if s in self.attention_in})


class FeedForward(MLP):
    """The paper's position-wise feed-forward: max(0, xW1 + b1)W2 + b2 (MLP itself supplies gelu/swiglu)."""

    def forward(self, x):
        if self.kind == "relu":
            return self.drop(self.down(F.relu(self.up(x))))
        return super().forward(x)


class _Residual(nn.Module):
    """One sublayer connection, post-LN (the paper) or pre-LN."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, fn):
        if self.pre:
            return x + self.drop(fn(self.norm(x)))
        return self.norm(x + self.drop(fn(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, attn: MultiHeadAttention):
        super().__init__()
        self.attn = attn
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff or 4 * cfg.d_model, cfg.activation, cfg.bias)
        self.r1, self.r2 = _Residual(cfg), _Residual(cfg)

    def forward(self, x, valid, reset):
        x = self.r1(x, lambda h: self.attn(h, causal=False, valid=valid, reset=reset))
        return self.r2(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, self_attn: MultiHeadAttention, cross_attn: MultiHeadAttention):
        super().__init__()
        self.self_attn = self_attn
        self.cross_attn = cross_attn
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff or 4 * cfg.d_model, cfg.activation, cfg.bias)
        self.r1, self.r2, self.r3 = _Residual(cfg), _Residual(cfg), _Residual(cfg)

    def forward(self, x, memory, src_valid, reset, self_cache=None, cross_cache=None):
        # Target padding sits after the real tokens, so the causal mask alone keeps it out of every real
        # query's view: decoder self-attention needs no padding mask (and no mask capability).
        x = self.r1(x, lambda h: self.self_attn(h, causal=True, reset=reset, cache=self_cache))
        x = self.r2(x, lambda h: self.cross_attn(h, context=memory, valid=src_valid, cache=cross_cache))
        return self.r3(x, self.ffn)


@dataclass
class DecodeState:
    """What incremental decoding carries between steps; every tensor has the hypotheses on dim 0."""

    memory: torch.Tensor  # [B, S, d] encoder output
    src_valid: torch.Tensor  # [B, S]
    prefix: torch.Tensor  # [B, t] tokens fed so far (used when the decoder cannot cache)
    self_caches: list[LayerCache] | None
    cross_caches: list[LayerCache] | None


def _reorder_cache(c: LayerCache, index: torch.Tensor) -> LayerCache:
    pick = lambda t: t.index_select(0, index) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return LayerCache(k=pick(c.k), v=pick(c.v), valid=pick(c.valid), state={k: pick(v) for k, v in c.state.items()})


class Transformer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.cfg = cfg
        n_dec = cfg.n_dec_layer or cfg.n_layer
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        enc = build_attention_layers(self._stack_cfg("encoder", cfg.n_layer), causal=False, rotary=False,
                                     extra_need={"mask": True})
        dec = build_attention_layers(self._stack_cfg("decoder", n_dec), causal=True, rotary=False)
        # Cross-attention: no transform (keys are another sequence), padding mask over the source, and as many
        # or fewer queries than keys in no fixed relation, which is what the kv_cache capability declares.
        cross = build_attention_layers(self._stack_cfg("cross", n_dec), causal=False, rotary=False, transform=False,
                                       d_context=cfg.d_model, extra_need={"mask": True, "kv_cache": True})
        self.encoder = nn.ModuleList(EncoderLayer(cfg, a) for a in enc)
        self.decoder = nn.ModuleList(DecoderLayer(cfg, s, c) for s, c in zip(dec, cross))
        pre = cfg.norm_position == "pre"
        self.enc_norm = make_norm(cfg.norm, cfg.d_model, cfg.bias) if pre else nn.Identity()
        self.dec_norm = make_norm(cfg.norm, cfg.d_model, cfg.bias) if pre else nn.Identity()
        # Decoder self-attention layers whose kernel cannot decode from a cache recompute the prefix each step.
        self.incremental = self._decoder_can_cache(n_dec)
        self._init_weights()

    def _stack_cfg(self, stack: str, n_layer: int):
        cfg = self.cfg
        spec = cfg.attention if stack in cfg.attention_in else AttentionSpec(
            transform=cfg.attention.transform, transform_options=cfg.attention.transform_options)
        return SimpleNamespace(attention=spec, n_layer=n_layer, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head,
                               d_model=cfg.d_model, rope_base=10000.0, bias=cfg.bias)

    def _decoder_can_cache(self, n_dec: int) -> bool:
        spec = self._stack_cfg("decoder", n_dec).attention
        return not select_layers(spec.layers, n_dec) or kernel_entry(spec.name).caps.kv_cache

    def _init_weights(self):
        # Xavier for projections (as in the reference tensor2tensor code); embeddings N(0, d^-1/2) so that the
        # √d-scaled input has unit variance and the tied output projection starts with unit-scale logits.
        for name, p in self.named_parameters():
            if p.dim() >= 2 and name != "embed.weight":
                nn.init.xavier_uniform_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        nn.init.normal_(self.embed.weight, 0.0, self.cfg.d_model ** -0.5)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- building blocks -------------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        n = ids.shape[1]
        if start + n > self.cfg.max_seq_len:
            raise UserError(f"sequence of {start + n} tokens is longer than the model's max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(ids) * math.sqrt(self.cfg.d_model) + self.pos_table[start:start + n]
        return self.drop(x)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src: [B, S] ids, right-padded with pad_id -> (memory [B, S, d], src_valid [B, S])."""
        valid = src != self.cfg.pad_id
        if not bool(valid[:, 0].all()):
            raise UserError("a source sequence is empty or left-padded; sources must be right-padded with pad_id")
        reset = torch.ones_like(valid)
        reset[:, 1:] = ~valid[:, :-1]
        x = self._embed(src)
        for layer in self.encoder:
            x = layer(x, valid, reset)
        return self.enc_norm(x), valid

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_valid: torch.Tensor, *, start: int = 0,
               self_caches=None, cross_caches=None) -> torch.Tensor:
        """tgt_in: [B, T] decoder inputs (BOS + target) at positions start.. -> logits [B, T, V]."""
        reset = torch.zeros_like(tgt_in, dtype=torch.bool)
        if start == 0:
            reset[:, 0] = True
        x = self._embed(tgt_in, start)
        for i, layer in enumerate(self.decoder):
            x = layer(x, memory, src_valid, reset,
                      self_caches[i] if self_caches is not None else None,
                      cross_caches[i] if cross_caches is not None else None)
        return F.linear(self.dec_norm(x), self.embed.weight)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] for decoder inputs `tgt_in` (BOS + target, right-padded)."""
        memory, src_valid = self.encode(src)
        return self.decode(tgt_in, memory, src_valid)

    # -- decoding protocol -----------------------------------------------------------------------------

    @property
    def max_decode_len(self) -> int:
        return self.cfg.max_seq_len

    def start(self, src: torch.Tensor) -> DecodeState:
        memory, src_valid = self.encode(src)
        b = src.shape[0]
        prefix = torch.empty(b, 0, dtype=torch.long, device=src.device)
        caches = [LayerCache() for _ in self.decoder]
        return DecodeState(memory, src_valid, prefix, caches if self.incremental else None,
                           [LayerCache() for _ in self.decoder])

    def step(self, state: DecodeState, tokens: torch.Tensor) -> tuple[torch.Tensor, DecodeState]:
        t = state.prefix.shape[1]
        state.prefix = torch.cat([state.prefix, tokens[:, None]], dim=1)
        if self.incremental:
            logits = self.decode(tokens[:, None], state.memory, state.src_valid, start=t,
                                 self_caches=state.self_caches, cross_caches=state.cross_caches)
        else:
            logits = self.decode(state.prefix, state.memory, state.src_valid, cross_caches=state.cross_caches)
        return logits[:, -1], state

    def reorder(self, state: DecodeState, index: torch.Tensor) -> DecodeState:
        return DecodeState(
            state.memory.index_select(0, index), state.src_valid.index_select(0, index),
            state.prefix.index_select(0, index),
            [_reorder_cache(c, index) for c in state.self_caches] if state.self_caches is not None else None,
            [_reorder_cache(c, index) for c in state.cross_caches],
        )
