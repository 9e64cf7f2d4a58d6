"""One evaluation for every caller: loss, perplexity and accuracy of an LM on a task's validation batches,
under an attention mode, optionally as a self-ensemble of K stochastic passes."""

from __future__ import annotations

import time

import torch

from ..errors import UserError
from ..inference.ensemble import evaluate_lm
from ..training.device import autocast

MODES = ("auto", "dense", "sample")


def evaluate(model, task, *, mode: str = "auto", ensemble: int = 1, split: str = "val", batches: int | None = None,
             device=None, amp=None, seed: int = 0) -> dict:
    """Metrics of `model` on `task`'s evaluation batches (`split`, at most `batches`).

    mode: "auto" (each kernel's own evaluation behaviour), "dense" (exact attention with the same weights) or
    "sample" (stochastic kernels keep subsampling). ensemble > 1 averages the probabilities of that many passes
    in "sample" mode (unless mode says otherwise). loss and ppl are per token (e-based); accuracy counts the
    positions the task scores.
    """
    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if ensemble < 1:
        raise UserError(f"ensemble must be at least 1, got {ensemble}")
    if ensemble > 1 and mode == "auto":
        mode = "sample"
    device = device or next(model.parameters()).device
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(torch.device(device), amp):
        m = evaluate_lm(model, task.eval_batches(split, batches), mode=mode, k=ensemble, seed=seed, device=device)
    if not m["tokens"]:
        raise UserError("no evaluation windows: the split is shorter than the context")
    return {"loss": m["loss"], "ppl": m["ppl"], "accuracy": m["accuracy"], "tokens": m["tokens"],
            "eval_s": time.perf_counter() - t0}
