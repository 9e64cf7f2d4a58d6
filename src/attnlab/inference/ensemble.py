"""Self-ensembles (SSA, arXiv 2306.01705): keep stochastic attention on at inference, run K passes and average
the predicted probabilities (not the logits).

Averaging happens in log space (a running log-sum-exp of log-probabilities), so a token whose probability is
tiny in every pass still gets a finite loss. A pass that produced a non-finite value at some position is left
out of that position's average, as the authors' code does; positions no pass covered are counted and left out
of the metrics.

Entry points:
- `attention_mode(model, mode)`: context manager that switches every kernel and restores each one after.
- `ensemble_log_probs(fn, k)`: log of the averaged probabilities of K calls of `fn() -> logits`.
- `ensemble_classify(model, *inputs, k=...)`: averaged class probabilities of a classifier.
- `evaluate_lm(model, batches, mode=..., k=...)`: loss / perplexity / accuracy of an LM under a mode: the one
  mean loss over windows that tasks, `attnlab eval` and experiments use (`attnlab.run.evaluate` wraps it).
- `mean_probability(log_probs)`: the averaging itself, for callers that hold per-pass log-probabilities.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..attention.registry import Kernel, set_attention_mode
from ..errors import UserError


@contextlib.contextmanager
def attention_mode(model: torch.nn.Module, mode: str | None):
    """Run a block with every kernel of `model` in `mode` (None: leave them), then restore each kernel's mode."""
    kernels = [m for m in model.modules() if isinstance(m, Kernel)]
    before = [m.mode for m in kernels]
    try:
        if mode is not None:
            set_attention_mode(model, mode)
        yield
    finally:
        for m, old in zip(kernels, before):
            m.mode = old


@contextlib.contextmanager
def _seeded(seed: int | None, device):
    """Seed the global RNG for the block without disturbing the caller's stream (None: no seeding)."""
    if seed is None:
        yield
        return
    devices = [device] if device is not None and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@dataclass
class EnsembleOutput:
    log_probs: torch.Tensor  # [..., C] log of the mean probability over the passes that were finite there
    passes: torch.Tensor  # [...] how many passes each position averaged (0: none was finite)


def mean_probability(log_probs: list[torch.Tensor]) -> EnsembleOutput:
    """log of the mean probability over passes (each [..., C]; C may be 1 when only the targets' probabilities
    are kept), leaving a pass out wherever any of its values at a position is non-finite."""
    acc = count = None
    for logp in log_probs:
        ok = torch.isfinite(logp).all(dim=-1)
        logp = torch.where(ok.unsqueeze(-1), logp, torch.full_like(logp, float("-inf")))
        acc, count = (logp, ok.long()) if acc is None else (torch.logaddexp(acc, logp), count + ok.long())
    mean = acc - torch.log(count.clamp(min=1).to(acc.dtype)).unsqueeze(-1)
    mean = torch.where((count > 0).unsqueeze(-1), mean, torch.full_like(mean, float("nan")))
    return EnsembleOutput(mean, count)


def ensemble_log_probs(fn: Callable[[], torch.Tensor], k: int) -> EnsembleOutput:
    """Call `fn` K times (each call returns logits [..., C], or a tuple whose first item is) and average the
    probabilities; a pass with any non-finite logit at a position is left out there."""
    if k < 1:
        raise UserError(f"ensemble size must be at least 1, got {k}")

    def passes():
        for _ in range(k):
            out = fn()
            logits = out[0] if isinstance(out, (tuple, list)) else out
            yield F.log_softmax(logits.float(), dim=-1)

    return mean_probability(passes())


@torch.no_grad()
def ensemble_classify(model: torch.nn.Module, *inputs, k: int = 16, mode: str | None = "sample",
                      seed: int | None = None, **kwargs) -> torch.Tensor:
    """Class probabilities [..., C] of `model(*inputs, **kwargs)` averaged over K stochastic passes."""
    was = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), None)
    try:
        with attention_mode(model, mode), _seeded(seed, device):
            return ensemble_log_probs(lambda: model(*inputs, **kwargs), k).log_probs.exp()
    finally:
        model.train(was)


def _as_batch(item) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if isinstance(item, dict):
        return item["x"], item["y"], item.get("loss_mask")
    x, y, *rest = item
    return x, y, (rest[0] if rest else None)


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, batches: Iterable, *, mode: str | None = "sample", k: int = 1,
                seed: int | None = None, device=None) -> dict:
    """Next-token loss, perplexity and accuracy of an LM over `batches` ((x, y[, loss_mask]) tuples or dicts
    with x, y, loss_mask), with the kernels in `mode` and K passes averaged in probability.

    mode "dense" (or "auto" in eval, for SSA) is deterministic, so K is taken as 1 there.
    """
    if mode in ("dense", "auto"):
        k = 1
    was = model.training
    model.eval()
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    nll, forward_s = 0.0, 0.0
    tokens = correct = dropped = 0
    batch_losses = []  # mean loss of each batch: paired comparisons between settings on the same batches
    try:
        with attention_mode(model, mode), _seeded(seed, device):
            for item in batches:
                x, y, loss_mask = _as_batch(item)
                x, y = x.to(device), y.to(device)
                t0 = time.perf_counter()
                ens = ensemble_log_probs(lambda: model(x), k)
                if torch.device(device).type == "cuda":
                    torch.cuda.synchronize(device)
                forward_s += time.perf_counter() - t0
                keep = ens.passes > 0
                if loss_mask is not None:
                    keep &= loss_mask.to(device)
                    dropped += int(((ens.passes == 0) & loss_mask.to(device)).sum())
                else:
                    dropped += int((ens.passes == 0).sum())
                logp = ens.log_probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)
                batch_nll = -float(logp[keep].double().sum())
                nll += batch_nll
                batch_losses.append(batch_nll / max(int(keep.sum()), 1))
                correct += int((ens.log_probs.argmax(-1) == y)[keep].sum())
                tokens += int(keep.sum())
    finally:
        model.train(was)
    if tokens == 0:
        raise UserError("ensemble evaluation scored no tokens (no batches, or every pass was non-finite)")
    loss = nll / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "accuracy": correct / tokens, "tokens": tokens,
            "k": k, "mode": mode, "dropped_tokens": dropped, "forward_s": forward_s, "batch_losses": batch_losses}
