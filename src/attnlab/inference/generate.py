"""Autoregressive generation for the decoder LM: greedy, temperature, top-k and nucleus sampling, KV cache."""

from __future__ import annotations

from typing import Iterable

import torch

from ..errors import UserError


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] = (),
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    sliding_window: bool = False,
) -> torch.Tensor:
    """Extend `prompt_ids` [B, T] by up to `max_new_tokens` tokens; returns [B, T + n] with n <= max_new_tokens.

    temperature=0 is greedy. top_k keeps the k most likely tokens, top_p the smallest set whose probability
    reaches p (both after temperature; ties keep the lower token id, so top_k=1 and a tiny top_p are greedy).
    A row that emits one of `stop_tokens` keeps that token and is padded with it afterwards; generation
    ends early once every row has stopped. `generator` seeds the sampling for reproducible draws.
    The model runs in eval mode (dropout off) and gets its training flag back afterwards.
    sliding_window: let the text grow past the model's max_seq_len by conditioning on its most recent tokens
    (the cache restarts from the last half-context whenever it fills); otherwise that is refused.
    """
    prompt_ids = _check(model, prompt_ids, 0 if sliding_window else max_new_tokens, temperature, top_k, top_p)
    vocab = model.cfg.vocab_size
    stops = torch.tensor(sorted({int(t) for t in stop_tokens}), dtype=torch.long, device=prompt_ids.device)
    if stops.numel() and not (0 <= int(stops.min()) and int(stops.max()) < vocab):
        raise UserError(f"stop tokens {stops.tolist()} must be token ids in 0..{vocab - 1}")
    out = prompt_ids
    if max_new_tokens == 0:
        return out.clone()

    was_training = model.training
    model.eval()
    try:
        b = out.shape[0]
        done = torch.zeros(b, dtype=torch.bool, device=out.device)
        fill = torch.zeros(b, dtype=torch.long, device=out.device)  # the stop token each finished row repeats
        cache = model.new_cache() if use_cache else None
        logits = model(out, cache=cache)[:, -1]
        in_cache = out.shape[1]
        for step in range(max_new_tokens):
            nxt = _pick(logits.float(), temperature, top_k, top_p, generator)
            nxt = torch.where(done, fill, nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if stops.numel():
                hit = ~done & torch.isin(nxt, stops)
                fill = torch.where(hit, nxt, fill)
                done = done | hit
                if bool(done.all()):
                    break
            if step + 1 == max_new_tokens:
                break
            logits, in_cache = _next_logits(model, out, cache, in_cache, sliding_window)
    finally:
        model.train(was_training)
    return out


def _next_logits(model, out, cache, in_cache: int, sliding_window: bool):
    """Logits after the newest token of `out`, and how many tokens the cache then holds."""
    limit = model.cfg.max_seq_len
    if cache is None:
        # Without a cache the whole (recent) sequence runs again: the slow reference path.
        return model(out[:, -limit:] if sliding_window else out)[:, -1], 0
    if in_cache + 1 > limit:
        # Restarting from half a context amortises the re-prefill over limit/2 new tokens.
        cache[:] = model.new_cache()
        keep = limit // 2
        return model(out[:, -keep:], cache=cache)[:, -1], keep
    return model(out[:, -1:], cache=cache)[:, -1], in_cache + 1


def _check(model, prompt_ids, max_new_tokens, temperature, top_k, top_p) -> torch.Tensor:
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        shape = tuple(prompt_ids.shape) if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__
        raise UserError(f"prompt_ids must be a [batch, length] tensor with at least one token, got {shape}")
    if prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
        raise UserError(f"prompt_ids must hold integer token ids, got dtype {prompt_ids.dtype}")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    total, limit = prompt_ids.shape[1] + int(max_new_tokens), model.cfg.max_seq_len
    if total > limit:
        raise UserError(
            f"prompt of {prompt_ids.shape[1]} tokens + {int(max_new_tokens)} new tokens = {total} exceeds the "
            f"model's max_seq_len={limit}; shorten the prompt or ask for fewer tokens"
        )
    return prompt_ids.long()


def _pick(logits: torch.Tensor, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    """Next token per row from logits [B, V]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # A stable sort puts the lower id first among equal logits, the same tie-break as argmax.
    sorted_logits, order = torch.sort(logits / temperature, dim=-1, descending=True, stable=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    keep = torch.ones_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        keep &= rank < top_k
    if top_p is not None:
        probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # The most likely token is always kept, so a tiny top_p degrades to greedy, never to nothing.
        keep &= (mass_before < top_p) | (rank == 0)
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    choice = torch.multinomial(probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)
