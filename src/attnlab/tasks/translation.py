"""Translation: token-count batches of a parallel corpus, label-smoothed loss, and evaluation by teacher-forced
loss plus greedy decoding of the validation set (BLEU, chrF, exact match)."""

from __future__ import annotations

import math

import torch

from ..data.parallel import (
    BatchSchedule,
    EncodedPairs,
    ParallelVocab,
    collate,
    encode_pairs,
)
from ..inference.beam import decode_all
from ..training.losses import label_smoothed_loss


def translation_scores(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, on detokenised text) and exact-match accuracy, all in percent."""
    import sacrebleu

    exact = sum(h.split() == r.split() for h, r in zip(hyps, refs)) / max(len(refs), 1)
    return {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score, "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
            "exact": 100.0 * exact}


class TranslationTask:
    """The trainer's task: token-count batches of a parallel corpus, label-smoothed loss, and evaluation
    by teacher-forced loss plus greedy decoding of the validation set."""

    metrics = ("val_loss", "val_ppl", "val_bleu", "val_exact")

    def __init__(self, train_data: EncodedPairs, valid: list[tuple[str, str]], vocab: ParallelVocab, *,
                 max_tokens: int, label_smoothing: float, seed: int = 0, grad_accum: int = 1, world: int = 1):
        self.vocab = vocab
        self.schedule = BatchSchedule(train_data, max_tokens, seed)
        self.eps = label_smoothing
        self.grad_accum, self.world = grad_accum, world
        self.valid_refs = [t for _, t in valid]
        self.valid_data = encode_pairs(valid, vocab)
        self.valid_batches = BatchSchedule(self.valid_data, max_tokens, seed).batches

    def batch(self, step, micro, rank, device):
        k = (step * self.grad_accum + micro) * self.world + rank
        return collate(self.schedule.data, self.schedule.indices(k), self.vocab.pad_id, self.vocab.bos_id, device)

    def loss(self, model, batch):
        logits = model(batch["src"], batch["tgt_in"])
        out = label_smoothed_loss(logits, batch["tgt_out"], self.eps, ignore_index=self.vocab.pad_id)
        return out.loss, out.tokens

    @torch.no_grad()
    def evaluate(self, model, device):
        loss_sum = nll_sum = 0.0
        count = 0
        for idx in self.valid_batches:
            b = collate(self.valid_data, idx, self.vocab.pad_id, self.vocab.bos_id, device)
            out = label_smoothed_loss(model(b["src"], b["tgt_in"]), b["tgt_out"], self.eps, ignore_index=self.vocab.pad_id)
            loss_sum += out.loss.item() * out.tokens
            nll_sum += out.nll.item() * out.tokens
            count += out.tokens
        hyps = decode_all(model, self.valid_data.src, method="greedy", device=device, batch_size=128)
        scores = translation_scores([self.vocab.decode(h) for h in hyps], self.valid_refs)
        return {"val_loss": loss_sum / count, "val_ppl": math.exp(min(nll_sum / count, 50.0)),
                "val_bleu": scores["bleu"], "val_exact": scores["exact"]}
