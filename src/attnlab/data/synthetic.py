"""Synthetic recall tasks generated from a torch.Generator: induction heads and multi-query associative
recall (MQAR). No files; the same generator state gives the same batch.

Both return dict(x, y, loss_mask): x [B, T] inputs, y [B, T] = the next token of each position (the
sequence shifted by one, as for language modelling), loss_mask [B, T] bool marking the only targets that
test recall. Models take them as `model(x, y, loss_mask=loss_mask)`.
"""

from __future__ import annotations

import torch

from attnlab.errors import UserError

FILLER = 0  # MQAR's "nothing here" token; keys start at 1 so it never collides with a key


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if int(v) != v or v < 1:
            raise UserError(f"{name} must be a positive integer, got {v}")


def _distinct(batch_size: int, n: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    """[B, n] tokens, each row n distinct values drawn uniformly from [low, high)."""
    scores = torch.rand(batch_size, high - low, generator=generator, device=generator.device)
    return scores.argsort(dim=1)[:, :n] + low


def _as_batch(seq: torch.Tensor, scored: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"x": seq[:, :-1].contiguous(), "y": seq[:, 1:].contiguous(), "loss_mask": scored}


def induction_batch(batch_size: int, seq_len: int, vocab_size: int, generator: torch.Generator,
                    prefix_len: int | None = None) -> dict[str, torch.Tensor]:
    """A prefix of `prefix_len` distinct random tokens, then pairs (prefix[j], prefix[j+1]) with a fresh
    random j for every pair. Scored targets are the second token of each pair: predicting it needs the
    earlier occurrence of the first token and what followed it (an induction head), and since j is random
    the position of a pair tells nothing.

    The sequence has seq_len + 1 tokens so x has seq_len; when the part after the prefix has odd length,
    its last token is an unscored random prefix token.
    """
    _check_positive(batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size)
    p = seq_len // 2 if prefix_len is None else prefix_len
    if int(p) != p or p < 2:
        raise UserError(f"induction prefix_len must be at least 2 (a token and its successor), got {p}")
    if p > vocab_size:
        raise UserError(f"induction prefix_len {p} exceeds vocab_size {vocab_size}: the prefix needs "
                        f"{p} distinct tokens")
    n_pairs = (seq_len + 1 - p) // 2
    if n_pairs < 1:
        raise UserError(f"induction seq_len {seq_len} leaves no room for a copied pair after a prefix of "
                        f"{p}; use seq_len >= prefix_len + 1")
    dev = generator.device
    prefix = _distinct(batch_size, p, 0, vocab_size, generator)
    j = torch.randint(0, p - 1, (batch_size, n_pairs), generator=generator, device=dev)
    pairs = torch.stack([prefix.gather(1, j), prefix.gather(1, j + 1)], dim=2).flatten(1)
    parts = [prefix, pairs]
    if (seq_len + 1 - p) % 2:
        lone = torch.randint(0, p, (batch_size, 1), generator=generator, device=dev)
        parts.append(prefix.gather(1, lone))
    seq = torch.cat(parts, dim=1)
    scored = torch.zeros(batch_size, seq_len, dtype=torch.bool, device=dev)
    # The pair's second token sits at sequence index p + 2i + 1, i.e. it is the target at x-index p + 2i.
    scored[:, p:p + 2 * n_pairs:2] = True
    return _as_batch(seq, scored)


def mqar_gap_probs(space: int, power_a: float) -> torch.Tensor:
    """p(gap) ∝ gap^(power_a - 1) for gap = 1..space: most queries come soon after the key-value block."""
    gaps = torch.arange(1, space + 1, dtype=torch.float64)
    p = gaps ** (power_a - 1)
    return p / p.sum()


def mqar_batch(batch_size: int, seq_len: int, vocab_size: int, num_kv_pairs: int, generator: torch.Generator,
               power_a: float = 0.01) -> dict[str, torch.Tensor]:
    """Multi-query associative recall, as in Zoology (Arora et al., 2023).

    The sequence opens with `num_kv_pairs` pairs (key, value): distinct keys from [1, V/2), distinct values
    from [V/2, V). After them come (seq_len - 2*num_kv_pairs) // 2 two-token slots; every key is queried
    once, in the slot gap - 1 where gap is drawn without replacement with p(gap) ∝ gap^(power_a - 1).
    The target right after a queried key is its value, the only scored position. Unused slots hold FILLER.

    Unlike Zoology, the value also follows the query in x, so y is x shifted by one everywhere; each key is
    queried once, so that copy never reaches a scored position.
    """
    _check_positive(batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size, num_kv_pairs=num_kv_pairs)
    if not power_a > 0:
        raise UserError(f"mqar power_a must be positive, got {power_a}")
    k = num_kv_pairs
    half = vocab_size // 2
    if half - 1 < k or vocab_size - half < k:
        raise UserError(f"mqar vocab_size {vocab_size} is too small for {k} distinct keys in [1, {half}) and "
                        f"values in [{half}, {vocab_size}); use vocab_size >= {2 * k + 2}")
    context = 2 * k
    space = (seq_len - context) // 2
    if space < k:
        raise UserError(f"mqar seq_len {seq_len} is too short for {k} key-value pairs and their queries; "
                        f"use seq_len >= {4 * k}")
    dev = generator.device
    keys = _distinct(batch_size, k, 1, half, generator)
    values = _distinct(batch_size, k, half, vocab_size, generator)
    probs = mqar_gap_probs(space, power_a).to(device=dev, dtype=torch.float32)
    slots = torch.multinomial(probs.expand(batch_size, space), k, replacement=False, generator=generator)
    seq = torch.full((batch_size, seq_len + 1), FILLER, dtype=torch.long, device=dev)
    seq[:, 0:context:2] = keys
    seq[:, 1:context:2] = values
    query_pos = context + 2 * slots
    seq.scatter_(1, query_pos, keys)
    seq.scatter_(1, query_pos + 1, values)
    scored = torch.zeros(batch_size, seq_len, dtype=torch.bool, device=dev)
    scored.scatter_(1, query_pos, True)
    return _as_batch(seq, scored)
