"""Language-modelling tasks for the trainer: a text corpus, or a synthetic recall task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..inference.ensemble import evaluate_lm
from ..training.trainer import batch_generator

_EVAL_SEED_OFFSET = 7_919_000  # evaluation batches come from seeds training never uses


def _lm_loss(model, batch):
    _, loss = model(batch["x"], batch["y"], loss_mask=batch.get("loss_mask"))
    return loss, batch["x"].numel()


class TextLMTask:
    """Next-token prediction on random windows of a corpus; evaluation on contiguous validation windows."""

    metrics = ("val_loss", "val_ppl")  # what `evaluate` reports: early stopping may watch any of them

    def __init__(self, corpus, seq_len: int, batch_size: int, seed: int = 0, eval_batches: int = 20):
        self.corpus, self.seq_len, self.batch_size = corpus, seq_len, batch_size
        self.seed, self.eval_batches_count = seed, eval_batches

    def batch(self, step, micro, rank, device):
        g = batch_generator(self.seed, step, micro, rank)
        x, y = self.corpus.random_windows("train", self.batch_size, self.seq_len, g)
        return {"x": x.to(device), "y": y.to(device)}

    loss = staticmethod(_lm_loss)

    def eval_batches(self, split: str = "val", limit: int | None = None):
        """Contiguous, non-overlapping windows of `split`: the same ones at every evaluation."""
        n = self.eval_batches_count if limit is None else limit
        for x, y in self.corpus.eval_windows(split, self.seq_len, self.batch_size, max_batches=n):
            yield {"x": x, "y": y}

    def evaluate(self, model, device):
        m = evaluate_lm(model, self.eval_batches(), mode=None, device=device)
        return {"val_loss": m["loss"], "val_ppl": m["ppl"]}


@dataclass
class SyntheticConfig:
    kind: Literal["induction", "mqar"] = "induction"
    """induction (copy after a repeated token) or mqar (multi-query associative recall)"""
    vocab_size: int = 128
    """vocabulary size of the task"""
    seq_len: int = 128
    """sequence length"""
    num_kv_pairs: int = 16
    """mqar only"""
    eval_batches: int = 8
    """fixed held-out batches per evaluation"""


class SyntheticTask:
    """Induction heads or multi-query associative recall; accuracy counts only the scored positions."""

    metrics = ("accuracy", "val_loss")

    def __init__(self, cfg: SyntheticConfig, batch_size: int, seed: int = 0):
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed

    def _make(self, g):
        from ..data.synthetic import induction_batch, mqar_batch

        c = self.cfg
        if c.kind == "induction":
            return induction_batch(self.batch_size, c.seq_len, c.vocab_size, g)
        return mqar_batch(self.batch_size, c.seq_len, c.vocab_size, c.num_kv_pairs, g)

    def batch(self, step, micro, rank, device):
        b = self._make(batch_generator(self.seed, step, micro, rank))
        return {k: v.to(device) for k, v in b.items()}

    loss = staticmethod(_lm_loss)

    def eval_batches(self, split: str = "val", limit: int | None = None):
        """Fixed evaluation batches, drawn from seeds that training never uses (`split` is ignored)."""
        n = self.cfg.eval_batches if limit is None else min(limit, self.cfg.eval_batches)
        for i in range(n):
            yield self._make(batch_generator(self.seed + _EVAL_SEED_OFFSET, i))

    def evaluate(self, model, device):
        m = evaluate_lm(model, self.eval_batches(), mode=None, device=device)
        return {"accuracy": m["accuracy"], "val_loss": m["loss"]}
