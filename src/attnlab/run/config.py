"""What a run is made of: its data, its model, and how it is trained. One `RunConfig` describes a run
completely; `attnlab train` takes it from the command line, experiments derive variants of it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from ..attention import AttentionSpec
from ..errors import UserError
from ..models.lm import LMConfig
from ..training import OptimConfig, TrainConfig


@dataclass
class DataConfig:
    """Where the tokens come from."""

    source: Literal["text", "induction", "mqar"] = "text"
    """text: a text file or folder (`path`); induction / mqar: a synthetic recall task generated on the fly"""
    path: str = ""
    """a text file, or a folder whose files are read in sorted order (source text)"""
    tokenizer: Literal["byte", "char", "bpe", "hf"] = "byte"
    """byte: 256 byte values; char: the characters of the corpus; bpe: byte-level BPE trained on the corpus;
    hf: a pretrained model's (set by `attnlab distill` from a transformers teacher, kept in RUN/tokenizer)"""
    bpe_vocab_size: int = 1024
    """vocabulary size of a trained BPE tokenizer"""
    val_fraction: float = 0.1
    """share of the corpus (its tail) held out for validation"""
    eval_batches: int = 20
    """validation batches per evaluation"""
    num_kv_pairs: int = 16
    """key-value pairs per sequence (source mqar)"""

    def __post_init__(self):
        if self.bpe_vocab_size < 257:
            raise UserError(f"data.bpe_vocab_size must be at least 257 (the bytes and one merge), got {self.bpe_vocab_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.eval_batches < 1:
            raise UserError(f"data.eval_batches must be at least 1, got {self.eval_batches}")
        if self.num_kv_pairs < 1:
            raise UserError(f"data.num_kv_pairs must be at least 1, got {self.num_kv_pairs}")


@dataclass
class RunConfig:
    """A decoder LM trained on a text corpus or a synthetic task."""

    out: str = "runs/train"
    """the run folder: checkpoints, metrics.jsonl, TensorBoard events, tokenizer"""
    task: Literal["lm"] = "lm"
    """what is trained: lm (a decoder LM on text or a synthetic task); other tasks take other options (give
    --task first on the command line to see them with --help)"""
    model: LMConfig = field(default_factory=LMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


# Variants are small functions over a base config (see experiments): these are the common ones.

def with_attention(cfg: RunConfig, **changes) -> RunConfig:
    """`cfg` with its model's attention spec changed (name, options, layers, transform, transform_options)."""
    return replace(cfg, model=replace(cfg.model, attention=replace(cfg.model.attention, **changes)))


def with_model(cfg: RunConfig, **changes) -> RunConfig:
    return replace(cfg, model=replace(cfg.model, **changes))


def with_train(cfg: RunConfig, **changes) -> RunConfig:
    return replace(cfg, train=replace(cfg.train, **changes))


def with_optim(cfg: RunConfig, **changes) -> RunConfig:
    return replace(cfg, optim=replace(cfg.optim, **changes))


def lm_run(*, vocab_size: int, n_layer: int, n_head: int, d_model: int, seq_len: int, batch_size: int, steps: int,
           lr: float, warmup_steps: int, eval_every: int, seed: int, data: DataConfig | None = None,
           attention: AttentionSpec | None = None, min_lr: float | None = None, **train) -> RunConfig:
    """The base config most experiments start from: a rotary LM, AdamW with cosine decay to lr/10, and a trainer
    that logs every 10 steps and keeps one checkpoint. Extra keyword arguments go to TrainConfig."""
    model = LMConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, d_model=d_model, max_seq_len=seq_len,
                     attention=attention or AttentionSpec())
    tcfg = TrainConfig(**{"steps": steps, "batch_size": batch_size, "eval_every": eval_every, "log_every": 10,
                          "seed": seed, "tensorboard": False, "keep_checkpoints": 1, "progress": False, **train})
    optim = OptimConfig(lr=lr, min_lr=lr / 10 if min_lr is None else min_lr, warmup_steps=warmup_steps)
    return RunConfig(out="", model=model, data=data or DataConfig(), train=tcfg, optim=optim)
