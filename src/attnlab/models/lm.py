"""A decoder-only language model whose attention comes from the registry. Read it top to bottom."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionSpec, LayerCache, MultiHeadAttention, build_kernel, build_transform, select_layers
from ..attention.registry import check_capabilities, kernel_entry, make_config, transforms
from ..attention.positions import AbsolutePositions, Rotary
from ..checks import fraction, literals, positive, require
from ..errors import UserError
from .blocks import Block, make_norm


@dataclass
class LMConfig:
    """The decoder LM: sizes, positions, normalisation, and its attention."""

    vocab_size: int = 256
    """vocabulary size (set from the tokenizer for text)"""
    n_layer: int = 4
    """number of Transformer layers"""
    n_head: int = 4
    """attention heads per layer"""
    n_kv_head: int | None = None
    """fewer than n_head for grouped-query attention"""
    d_model: int = 128
    """model width"""
    d_ff: int | None = None
    """default: 4·d (gelu) or ≈8/3·d (swiglu)"""
    max_seq_len: int = 256
    """longest sequence the model accepts (its context)"""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """normalisation layer"""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """MLP type: gelu (4·d wide) or swiglu (≈8/3·d wide)"""
    pos: Literal["rope", "sinusoidal", "learned", "none"] = "rope"
    """positions: rotary, sinusoidal or learned absolute, or none"""
    rope_base: float = 10000.0
    """rotary base frequency"""
    dropout: float = 0.0
    """dropout rate"""
    bias: bool = False
    """biases in linear layers and norms"""
    tie_embeddings: bool = True
    """share the input embedding with the output head"""
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    """the attention mechanism, where it runs, and an optional key/value transform"""

    def __post_init__(self):
        p = "model"
        positive(self, p, "vocab_size", "n_layer", "n_head", "d_model", "max_seq_len", "rope_base")
        positive(self, p, "n_kv_head", "d_ff", optional=True)
        fraction(self, p, "dropout")
        literals(self, p)
        check_heads(self, p)
        if self.pos == "rope":
            require((self.d_model // self.n_head) % 2 == 0,
                    f"{p}.pos rope needs an even head dimension, but d_model/n_head = {self.d_model // self.n_head}")
        if self.pos == "sinusoidal":
            require(self.d_model % 2 == 0, f"{p}.pos sinusoidal needs an even d_model, got {self.d_model}")
        check_attention_spec(self.attention, f"{p}.attention", {"decoder": (self.n_layer, {"causal": True})})


def check_heads(cfg, p: str) -> None:
    """d_model splits into n_head heads, and the query heads into n_kv_head groups."""
    require(cfg.d_model % cfg.n_head == 0,
            f"{p}.d_model ({cfg.d_model}) must be divisible by {p}.n_head ({cfg.n_head})")
    if cfg.n_kv_head is not None:
        require(cfg.n_head % cfg.n_kv_head == 0,
                f"{p}.n_head ({cfg.n_head}) must be a multiple of {p}.n_kv_head ({cfg.n_kv_head})")


def check_attention_spec(spec: AttentionSpec, p: str, stacks: dict[str, tuple[int, dict]]) -> None:
    """Names, options, layer selection and capabilities of an AttentionSpec, without building anything.

    stacks: {stack: (its number of layers, the capabilities it needs)}; the selection must fit each stack,
    and the mechanism must have the capabilities of every stack where it runs in at least one layer.
    """
    entry = kernel_entry(spec.name)
    make_config(entry.config_cls, spec.options, f"attention {spec.name!r}")
    if spec.transform in (None, "", "none"):
        require(not spec.transform_options, f"{p}.transform_options were given but {p}.transform is none")
    else:
        tf = transforms().get(spec.transform)
        require(tf is not None, f"unknown {p}.transform {spec.transform!r}; choose one of: none, "
                                f"{', '.join(sorted(transforms()))}")
        make_config(tf.config_cls, spec.transform_options, f"transform {spec.transform!r}")
    for stack, (n, need) in stacks.items():
        try:
            chosen = select_layers(spec.layers, n)
        except UserError as e:
            where = f" ({stack})" if len(stacks) > 1 else ""
            raise UserError(f"{p}.layers{where}: {e}") from None
        if chosen:
            check_capabilities(entry, need)


def build_attention_layers(cfg, *, causal: bool, d_context: int | None = None, rotary: bool = True,
                           transform: bool = True, extra_need: dict | None = None) -> list[MultiHeadAttention]:
    """One attention layer per model layer: `cfg.attention.name` in the selected layers, exact elsewhere.

    Capabilities are checked here, once, so an impossible combination fails when the model is built.
    """
    spec: AttentionSpec = cfg.attention
    chosen = set(select_layers(spec.layers, cfg.n_layer))
    need = {"causal": causal, "noncausal": not causal, **(extra_need or {})}
    head_dim = cfg.d_model // cfg.n_head  # the config checked divisibility when it was made
    n_kv = cfg.n_kv_head or cfg.n_head
    layers = []
    for i in range(cfg.n_layer):
        name, opts = (spec.name, spec.options) if i in chosen else ("exact", {})
        kernel = build_kernel(name, opts, need=need)
        tf = build_transform(spec.transform, spec.transform_options, n_kv_head=n_kv, head_dim=head_dim) if transform else None
        rope = Rotary(head_dim, cfg.rope_base) if rotary else None
        layers.append(MultiHeadAttention(cfg.d_model, cfg.n_head, kernel, n_kv_head=n_kv, transform=tf,
                                         rotary=rope, bias=cfg.bias, d_context=d_context, need=need))
    return layers


class LM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = AbsolutePositions(cfg.pos, cfg.max_seq_len, cfg.d_model) if cfg.pos in ("sinusoidal", "learned") else None
        attns = build_attention_layers(cfg, causal=True, rotary=cfg.pos == "rope")
        self.blocks = nn.ModuleList(Block(cfg, a, causal=True) for a in attns)
        self.ln_f = make_norm(cfg.norm, cfg.d_model, cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # GPT-2's scaled init of residual projections keeps the residual stream's variance flat in depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.blocks]

    def forward(self, idx, targets=None, *, cache: list[LayerCache] | None = None, doc_ids=None, valid=None,
                loss_mask=None):
        """idx: [B, N] token ids. Returns logits [B, N, V], or (logits, loss) when targets are given.

        doc_ids: [B, N] packed-document ids (attention and transforms stay inside a document);
        valid: [B, N] bool, False at padding; loss_mask: [B, N] bool, which targets count.
        cache: a list from `new_cache()`, extended in place (decoding).
        """
        b, n = idx.shape
        start = cache[0].length if cache is not None else 0
        if start + n > self.cfg.max_seq_len:
            raise UserError(f"sequence of {start + n} tokens is longer than the model's max_seq_len={self.cfg.max_seq_len}")
        positions = torch.arange(start, start + n, device=idx.device)
        x = self.embed(idx)
        if self.pos is not None:
            x = x + self.pos(positions)
        x = self.drop(x)
        mask, reset = None, None
        if doc_ids is not None:
            mask = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
            reset = torch.ones_like(doc_ids, dtype=torch.bool)
            reset[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        if valid is not None:
            prev_pad = torch.ones_like(valid)
            prev_pad[:, 1:] = ~valid[:, :-1]
            if start > 0:  # a decoding call's first token follows the cache's last one, not padding
                prev_pad[:, 0] = False if cache[0].valid is None else ~cache[0].valid[:, -1]
            reset = prev_pad if reset is None else (reset | prev_pad)
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask, valid=valid, reset=reset, positions=positions,
                      cache=cache[i] if cache is not None else None)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return logits, lm_loss(logits, targets, loss_mask)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            # The lookup table is an embedding whether tied or not; an untied head is a matmul and stays counted.
            n -= self.embed.weight.numel()
            if self.pos is not None and isinstance(self.pos.table, nn.Parameter):
                n -= self.pos.table.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6·N plus 12·L·d·T for the attention scores."""
        t = seq_len or self.cfg.max_seq_len
        return 6 * self.num_params(non_embedding=False) + 12 * self.cfg.n_layer * self.cfg.d_model * t


def lm_loss(logits, targets, loss_mask=None):
    if loss_mask is not None:
        targets = targets.masked_fill(~loss_mask, -100)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
