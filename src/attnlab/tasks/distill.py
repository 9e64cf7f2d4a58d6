"""Distillation: an LM task whose training loss mixes the teacher's softened distribution with the labels,

    loss = α · T² · KL(teacher_T ‖ student_T) + (1 − α) · CE(student, labels),

where p_T = softmax(logits / T); the T² keeps the KL's gradients on the scale of the CE's as T grows (Hinton et
al., 2015). Evaluation is the wrapped task's own (the student's validation loss against the labels), so a
distilled student and one trained from scratch are scored alike.

The teacher runs on the fly, or its top-k log-probabilities (at T = 1) are cached on disk, one file per batch
named by a hash of the batch's tokens: k · 6 bytes per token (fp16 values, int32 indices), against V · 2 for
the whole distribution. With top-k, the KL runs over the teacher's k tokens, renormalised at temperature T.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

BYTES_PER_CACHED_TOKEN = 6  # per kept log-probability: fp16 value + int32 index


def distill_loss(student_logits, targets, teacher, *, alpha: float, temperature: float, loss_mask=None):
    """(loss, ce, kl). teacher: logits [B, N, V], or a (log-probs [B, N, k], indices [B, N, k]) top-k pair."""
    logits = student_logits.float()
    t = float(temperature)
    keep = torch.ones_like(targets, dtype=torch.bool) if loss_mask is None else loss_mask
    ce_targets = targets.masked_fill(~keep, -100)
    ce = F.cross_entropy(logits.flatten(0, 1), ce_targets.flatten(), ignore_index=-100)
    log_q = F.log_softmax(logits / t, dim=-1)
    if isinstance(teacher, tuple):
        logp, idx = teacher
        log_p = F.log_softmax(logp.float() / t, dim=-1)  # softmax(logp/T) over the k kept tokens
        log_q = log_q.gather(-1, idx.long())
    else:
        log_p = F.log_softmax(teacher.float() / t, dim=-1)
    kl_tok = (log_p.exp() * (log_p - log_q)).sum(-1)
    kl = (kl_tok * keep).sum() / keep.sum().clamp_min(1)
    return alpha * t * t * kl + (1 - alpha) * ce, ce, kl


class DistillTask:
    """Wraps an LM task: same batches and evaluation, the distillation loss for training."""

    def __init__(self, base, teacher, *, alpha: float, temperature: float, top_k: int = 0, cache_dir=None):
        self.base, self.teacher = base, teacher.eval()
        self.alpha, self.temperature, self.top_k = alpha, temperature, top_k
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = base.metrics
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def batch(self, step, micro, rank, device):
        return self.base.batch(step, micro, rank, device)

    def eval_batches(self, split: str = "val", limit: int | None = None):
        return self.base.eval_batches(split, limit)

    def evaluate(self, model, device):
        return self.base.evaluate(model, device)

    def _teacher_out(self, x):
        if self.cache_dir is not None:
            path = self.cache_dir / f"{self._key(x)}.safetensors"
            if path.is_file():
                from safetensors.torch import load_file

                t = load_file(str(path), device=str(x.device))
                return t["logp"], t["idx"]
        self.teacher.to(x.device)
        with torch.no_grad():
            logits = self.teacher(x).float()
        if not self.top_k:
            return logits
        logp, idx = F.log_softmax(logits, dim=-1).topk(min(self.top_k, logits.shape[-1]), dim=-1)
        out = logp.half(), idx.int()
        if self.cache_dir is not None:
            from safetensors.torch import save_file

            save_file({"logp": out[0].contiguous().cpu(), "idx": out[1].contiguous().cpu()}, str(path))
        return out

    def _key(self, x) -> str:
        h = hashlib.sha256(f"{tuple(x.shape)}|k{self.top_k}".encode())
        h.update(x.detach().cpu().to(torch.int64).numpy().tobytes())
        return h.hexdigest()[:32]

    def loss(self, model, batch):
        x, y = batch["x"], batch["y"]
        logits = model(x)
        teacher = self._teacher_out(x)
        loss, _, _ = distill_loss(logits, y, teacher, alpha=self.alpha, temperature=self.temperature,
                                  loss_mask=batch.get("loss_mask"))
        return loss, x.numel()
