"""Greedy and beam-search decoding for sequence-to-sequence models, batched over sentences.

A model decodes through three methods (the Transformer of `models.seq2seq` and the LSTM of `models.rnn` have
them), plus `cfg.bos_id / eos_id / pad_id` and `max_decode_len`:

    state = model.start(src)                    # src [B, S] right-padded -> encoder state
    logits, state = model.step(state, tokens)   # tokens [B] (last token of each hypothesis) -> [B, V]
    state = model.reorder(state, index)         # index [B'] into dim 0: keep / duplicate hypotheses

Beam search follows GNMT (Wu et al. 2016): at each step the 2K best continuations of the K live hypotheses
are ranked by log-probability (all live hypotheses have the same length, so the length penalty cannot reorder
them); an EOS among the K best finishes a hypothesis, scored by log p / lp with lp = ((5 + |Y|) / 6)^α (|Y|
counts the EOS), and the K best finished ones are kept; the K best non-EOS continuations live on. A sentence
is done when K hypotheses have finished and no live one can still beat the worst of them (its log-probability
can only fall; it is divided by the most lenient penalty it could reach). Stopping as soon as K hypotheses
have finished, as fairseq does, fails on peaked models: with label smoothing every wrong token, EOS included,
sits at the same small probability, so early EOS candidates fill the K slots while the best hypothesis is
still being written. At `max_len` every live hypothesis is made to end. With K = 1 and α = 0 this is exactly
greedy decoding; with α > 0 a single beam may look past an early EOS for a longer, better-scored ending.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..errors import UserError


class Decodable(Protocol):
    cfg: Any
    max_decode_len: int

    def start(self, src: torch.Tensor) -> Any: ...
    def step(self, state: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, Any]: ...
    def reorder(self, state: Any, index: torch.Tensor) -> Any: ...


def default_max_len(src: torch.Tensor, pad_id: int) -> int:
    """Generous length limit (tokens generated, EOS included): twice the longest source plus 10."""
    return int((src != pad_id).sum(dim=1).max()) * 2 + 10


def _limit(model, src, max_len):
    n = default_max_len(src, model.cfg.pad_id) if max_len is None else max_len
    if n < 1:
        raise UserError(f"max_len must be at least 1, got {n}")
    return min(n, model.max_decode_len)


def _log_probs(model, logits: torch.Tensor) -> torch.Tensor:
    # Padding and BOS are never a prediction; masking them keeps greedy and beam on the same candidates.
    logp = F.log_softmax(logits.float(), dim=-1)
    logp[:, model.cfg.pad_id] = float("-inf")
    logp[:, model.cfg.bos_id] = float("-inf")
    return logp


@torch.no_grad()
def greedy_decode(model: Decodable, src: torch.Tensor, max_len: int | None = None) -> list[list[int]]:
    """Most probable token at each step; returns each sentence's tokens without BOS/EOS."""
    cfg = model.cfg
    n = _limit(model, src, max_len)
    b = src.shape[0]
    state = model.start(src)
    tokens = torch.full((b,), cfg.bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(b, dtype=torch.bool, device=src.device)
    out = []
    for t in range(n):
        logits, state = model.step(state, tokens)
        tokens = _log_probs(model, logits).argmax(dim=-1)
        if t == n - 1:  # `max_len` counts the EOS, as in beam search
            tokens = torch.full_like(tokens, cfg.eos_id)
        tokens = tokens.masked_fill(done, cfg.pad_id)
        out.append(tokens)
        done |= tokens == cfg.eos_id
        if bool(done.all()):
            break
    seqs = torch.stack(out, dim=1).tolist()
    return [_strip(s, cfg.eos_id, cfg.pad_id) for s in seqs]


def _strip(seq: list[int], eos: int, pad: int) -> list[int]:
    if eos in seq:
        seq = seq[: seq.index(eos)]
    return [t for t in seq if t != pad]


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's lp(Y) = ((5 + |Y|) / 6)^α (Wu et al. 2016)."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def beam_search(model: Decodable, src: torch.Tensor, beam_size: int = 4, alpha: float = 0.6,
                max_len: int | None = None, return_scores: bool = False):
    """Best hypothesis per sentence (tokens without BOS/EOS); with return_scores also its normalised score."""
    if beam_size < 1:
        raise UserError(f"beam size must be at least 1, got {beam_size}")
    cfg = model.cfg
    n = _limit(model, src, max_len)
    b, k, dev = src.shape[0], beam_size, src.device
    state = model.reorder(model.start(src), torch.arange(b, device=dev).repeat_interleave(k))
    # Only the first copy of each sentence is live at the start, so the K beams do not all pick the same token.
    scores = torch.full((b, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0
    tokens = torch.full((b * k,), cfg.bos_id, dtype=torch.long, device=dev)
    history = torch.empty(b * k, 0, dtype=torch.long, device=dev)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    done = [False] * b
    base = (torch.arange(b, device=dev) * k)[:, None]
    for t in range(n):
        logits, state = model.step(state, tokens)
        logp = _log_probs(model, logits)
        v = logp.shape[-1]
        if 2 * k > v:
            raise UserError(f"beam size {k} is too large for a vocabulary of {v}")
        if t == n - 1:
            forced = torch.full_like(logp, float("-inf"))
            forced[:, cfg.eos_id] = logp[:, cfg.eos_id].clamp_min(-1e9)  # a hypothesis must end here
            logp = forced
        cand = (scores.reshape(-1, 1) + logp).view(b, k * v)
        top_s, top_i = cand.topk(2 * k, dim=1)
        beam, tok = top_i // v, top_i % v
        is_eos = tok == cfg.eos_id
        lp = length_penalty(t + 1, alpha)
        eos_rows, eos_cols = torch.nonzero(is_eos[:, :k] & torch.isfinite(top_s[:, :k]), as_tuple=True)
        for r, c in zip(eos_rows.tolist(), eos_cols.tolist()):
            if done[r]:
                continue
            fin = finished[r]
            score = float(top_s[r, c]) / lp
            if len(fin) == k:
                worst = min(range(k), key=lambda i: fin[i][0])
                if score <= fin[worst][0]:
                    continue
                fin.pop(worst)
            fin.append((score, history[r * k + int(beam[r, c])].tolist()))
        live_s = top_s.masked_fill(is_eos, float("-inf"))
        keep_s, keep_j = live_s.topk(k, dim=1)
        # A live hypothesis can still win only if its best reachable score beats the worst finished one:
        # log-probabilities only fall, so the bound is its score now over the most lenient future penalty.
        lenient = max(length_penalty(t + 2, alpha), length_penalty(n, alpha))
        for r in range(b):
            if not done[r] and len(finished[r]) == k:
                done[r] = min(f[0] for f in finished[r]) >= float(keep_s[r, 0]) / lenient
        if all(done):
            break
        rows = (base + beam.gather(1, keep_j)).reshape(-1)
        tokens = tok.gather(1, keep_j).reshape(-1)
        scores = keep_s
        history = torch.cat([history.index_select(0, rows), tokens[:, None]], dim=1)
        state = model.reorder(state, rows)
    best = []
    for r in range(b):
        score, seq = max(finished[r], key=lambda x: x[0])
        best.append((score, _strip(seq, cfg.eos_id, cfg.pad_id)))
    if return_scores:
        return [s for _, s in best], [sc for sc, _ in best]
    return [s for _, s in best]


def pad_batch(seqs: list[list[int]], pad_id: int, device=None) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    out = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device)


@torch.no_grad()
def decode_all(model: Decodable, sources: list[list[int]], *, method: str = "greedy", beam_size: int = 4,
               alpha: float = 0.6, max_len: int | None = None, batch_size: int = 64, device=None) -> list[list[int]]:
    """Decode many sources (token ids, EOS included) in length-sorted batches; results in input order."""
    if method not in ("greedy", "beam"):
        raise UserError(f"decoding method must be greedy or beam, got {method!r}")
    was = model.training
    model.eval()
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[list[int] | None] = [None] * len(sources)
    try:
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            src = pad_batch([sources[j] for j in idx], model.cfg.pad_id, device)
            if method == "greedy":
                hyps = greedy_decode(model, src, max_len)
            else:
                hyps = beam_search(model, src, beam_size, alpha, max_len)
            for j, h in zip(idx, hyps):
                out[j] = h
    finally:
        model.train(was)
    return out  # type: ignore[return-value]
