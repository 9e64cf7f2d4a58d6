"""Config → (model, tokenizer, task). The one place that knows how the pieces of a run fit together."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path

import torch

from ..attention.kv_shift import KVShift
from ..data import TextCorpus, build_tokenizer, load_tokenizer, read_text
from ..errors import UserError, require_file
from ..models.lm import LM, LMConfig
from ..tasks import SyntheticConfig, SyntheticTask, TextLMTask
from ..training import is_main
from .config import DataConfig, RunConfig


def tokenizer_for(data: DataConfig, run_dir: Path | None = None, *, fresh: bool = True):
    """The run's tokenizer (None for synthetic tasks). A run folder keeps it in RUN/tokenizer: a fresh run builds
    (or trains) it there, later uses of the folder reload it."""
    if data.source != "text":
        return None
    tok_dir = Path(run_dir) / "tokenizer" if run_dir is not None else None
    if not fresh and tok_dir is not None and tok_dir.is_dir():
        return load_tokenizer(tok_dir)
    if not data.path:
        raise UserError("data.path is required for source=text (a text file or folder)")
    require_file(data.path, "data")
    text = read_text(data.path) if data.tokenizer != "byte" else None
    tok = build_tokenizer(data.tokenizer, text, vocab_size=data.bpe_vocab_size)
    if tok_dir is not None and is_main():
        tok.save(tok_dir)
    return tok


def corpus_for(data: DataConfig, tokenizer) -> TextCorpus:
    if not data.path:
        raise UserError("data.path is required for source=text (a text file or folder)")
    return TextCorpus(data.path, tokenizer, val_fraction=data.val_fraction)


def build_task(data: DataConfig, model_cfg: LMConfig, batch_size: int, seed: int, tokenizer=None, *,
               seq_len: int | None = None, corpus: TextCorpus | None = None):
    """The trainer's task for `data`: windows of a corpus, or a synthetic recall task at the model's length.
    Pass `corpus` to share one tokenised corpus between runs."""
    seq_len = seq_len or model_cfg.max_seq_len
    if data.source == "text":
        corpus = corpus or corpus_for(data, tokenizer)
        return TextLMTask(corpus, seq_len, batch_size, seed=seed, eval_batches=data.eval_batches)
    syn = SyntheticConfig(kind=data.source, vocab_size=model_cfg.vocab_size, seq_len=seq_len,
                          num_kv_pairs=data.num_kv_pairs, eval_batches=data.eval_batches)
    return SyntheticTask(syn, batch_size, seed=seed)


def build_model(cfg: LMConfig, seed: int | None = None, *, paired: bool = False) -> LM:
    """An LM with its initial weights drawn from `seed` (None: the global generator as it stands).

    paired: the weights of the same LM without its key/value transform, plus the transform's own parameters.
    Building a transform draws random numbers, which would shift every later layer's initial weights; pairing
    keeps a seed's variants identical except for the mechanism under test.
    """
    if seed is not None:
        torch.manual_seed(seed)
    if not paired or cfg.attention.transform in (None, "", "none"):
        return LM(cfg)
    base = LM(replace(cfg, attention=replace(cfg.attention, transform="none", transform_options={})))
    if seed is not None:
        torch.manual_seed(seed)
    model = LM(cfg)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    extra = [k for k in missing if not isinstance(model.get_submodule(k.rsplit(".", 1)[0]), KVShift)]
    if extra or unexpected:
        raise RuntimeError(f"paired init: unexpected differences {extra + list(unexpected)}")
    return model


def run_record(cfg) -> dict:
    """What a checkpoint records of the run config `cfg` of any kind, for its kind's `load` and for resume checks:
    every section but the trainer's own (train, optim) and the folder (out)."""
    return {"task": getattr(cfg, "task", "lm"),
            **{f.name: asdict(v) if is_dataclass(v := getattr(cfg, f.name)) else v
               for f in fields(cfg) if f.name not in ("out", "task", "train", "optim")}}


@dataclass
class Built:
    model: LM
    tokenizer: object
    task: object
    config: RunConfig


def build(cfg: RunConfig, run_dir: Path | None = None, *, fresh: bool = True, paired: bool = False,
          corpus: TextCorpus | None = None, tokenizer=None) -> Built:
    """Everything a run needs, in the order that keeps it reproducible: tokenizer (it fixes the vocabulary),
    then the model from `train.seed`, then the task."""
    tok = tokenizer if tokenizer is not None else tokenizer_for(cfg.data, run_dir, fresh=fresh)
    model_cfg = cfg.model if tok is None else replace(cfg.model, vocab_size=tok.vocab_size)
    cfg = replace(cfg, model=model_cfg)
    model = build_model(model_cfg, cfg.train.seed, paired=paired)
    task = build_task(cfg.data, model_cfg, cfg.train.batch_size, cfg.train.seed, tok, corpus=corpus)
    return Built(model, tok, task, cfg)
