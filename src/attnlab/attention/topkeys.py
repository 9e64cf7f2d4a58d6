"""Top keys: exact attention over a budget of keys per (batch, key/value head), chosen by a key score.

Every query of a (batch element, head) sees the same `budget` keys, picked from the keys alone (no query
is looked at): a query-independent "universal set" of important keys, as in

- "LevAttention: Time, Space, and Streaming Efficient Algorithm for Heavy Attentions" (Kannan,
  Bhattacharyya, Kacham, Woodruff, ICLR 2025): the keys with the largest statistical leverage scores,
  taken top-k per head; a ViT keeps > 90 % of its accuracy with the top 32 of 197 keys, and does much better
  when it is trained with the selection than when the selection is swapped into a softmax-trained model;
- "Efficient Attention via Pre-Scoring: Prioritizing Informative Keys in Transformers" (Li, Wang, Bao,
  Woodruff, 2025): k-means (or k-median) clustering of the keys per batch and head (4 clusters, 10 Lloyd
  rounds in its ViT experiment), then keys *sampled* without replacement with probability proportional to
  their distance from their own centroid (64 of 197 keys of a ViT-L/16).

Methods (`prescore` holds the scores):
- "kmeans" / "kmedian": distance of a key to its nearest centroid (Euclidean; k-median: coordinate-wise
  median centroids, the papers' variant), centroids seeded by k-means++ (the official code seeds uniformly);
- "leverage": the true leverage score k_iᵀ(KᵀK)⁺k_i of each key;
- "norm": ‖k_i‖², the cheap proxy the official "leverage" code computes;
- "random": every key alike, i.e. a uniformly random subset (the control).
`selection` "auto" samples for the clustering methods and random (as the pre-scoring paper does) and takes the
top scores for leverage and norm (as LevAttention does); "top" or "sample" forces one rule for all. Sampling
without replacement ∝ score is the Gumbel-top-k trick (the same law as drawing one key at a time ∝ score
among those not yet drawn, what torch.multinomial does without replacement).

The choice is made without gradients (it is a discrete selection); the gathered keys and values carry
gradients, so a model trains through the kernel (LevAttention's training from scratch). A budget of at
least the number of keys is exact attention. Non-causal only, without masks: a query-independent subset has
no meaning for a causal prefix or a padded batch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import UserError
from .exact import exact_attention
from .hyper.prescore import fit_centroids, leverage_scores, nearest_centroid, norm_scores
from .registry import Capabilities, Kernel, register_kernel

METHODS = ("kmeans", "kmedian", "leverage", "norm", "random")


@dataclass
class TopKeysConfig:
    """method: kmeans | kmedian | leverage | norm | random (how keys are scored).
    budget: keys every query attends to, per (batch, key/value head); >= the number of keys: exact attention.
    selection: auto (sample for kmeans, kmedian and random; top for leverage and norm), top or sample.
    clusters / iters: k-means / k-median clusters and Lloyd rounds (the pre-scoring paper's ViT: 4 clusters;
    iters null: 10 for k-means as there, 3 for k-median, whose median update costs several k-means rounds).
    seed: an int draws the same clusters and samples on every call; null draws from torch's global RNG.
    """

    method: Literal["kmeans", "kmedian", "leverage", "norm", "random"] = "leverage"
    budget: int = 32
    selection: Literal["auto", "top", "sample"] = "auto"
    clusters: int = 4
    iters: int | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"topkeys method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.selection not in ("auto", "top", "sample"):
            raise UserError(f"topkeys selection must be auto, top or sample, got {self.selection!r}")
        if self.budget < 1:
            raise UserError(f"topkeys budget must be at least 1, got {self.budget}")
        if self.clusters < 1 or (self.iters is not None and self.iters < 0):
            raise UserError(f"topkeys needs clusters >= 1 and iters >= 0, got {self.clusters} and {self.iters}")

    @property
    def sampled(self) -> bool:
        if self.selection != "auto":
            return self.selection == "sample"
        return self.method in ("kmeans", "kmedian", "random")


def key_weights(k: torch.Tensor, method: str, *, clusters: int = 4, iters: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Non-negative score of every key [..., N, D] -> float [..., N]: higher = more worth keeping."""
    lead, (n, d) = k.shape[:-2], k.shape[-2:]
    if method in ("kmeans", "kmedian"):
        iters = (10 if method == "kmeans" else 3) if iters is None else iters
        x = k.reshape(-1, n, d).float()
        cents = fit_centroids(x, max(1, min(clusters, n)), iters, median=method == "kmedian", generator=generator)
        return nearest_centroid(x, cents)[0].reshape(*lead, n)
    if method == "leverage":
        return leverage_scores(k)
    if method == "norm":
        return norm_scores(k)
    if method == "random":
        return torch.ones(k.shape[:-1], device=k.device)
    raise UserError(f"unknown topkeys method {method!r}; choose one of {', '.join(METHODS)}")


def choose(weights: torch.Tensor, budget: int, *, sample: bool,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices [..., budget] (sorted) of the keys to keep: the `budget` largest weights, or a draw without
    replacement with probability ∝ weight (Gumbel-top-k; zero-weight keys come last)."""
    w = weights.double()
    if sample:
        u = torch.rand(w.shape, generator=generator, device=w.device, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))
        w = torch.log(w.clamp_min(1e-300)) + gumbel
    return w.topk(budget, dim=-1).indices.sort(dim=-1).values


@register_kernel("topkeys", TopKeysConfig, Capabilities(causal=False, mask=False, kv_cache=False, stochastic=True),
                 "exact attention over a budget of keys per head chosen by k-means, k-median, leverage, norm or random")
class TopKeysAttention(Kernel):
    """Exact attention over the keys a pre-scoring method keeps (LevAttention; the pre-scoring paper's ViT)."""

    small_options = {"budget": 64}

    def select(self, k: torch.Tensor) -> torch.Tensor:
        """The kept keys' indices [B, Hkv, budget] for keys [B, Hkv, N, D]."""
        cfg = self.config
        g = None
        if cfg.seed is not None:
            g = torch.Generator(device=k.device)
            g.manual_seed(cfg.seed)
        with torch.no_grad():
            w = key_weights(k.detach(), cfg.method, clusters=cfg.clusters, iters=cfg.iters, generator=g)
            return choose(w, min(cfg.budget, k.shape[-2]), sample=cfg.sampled, generator=g)

    def attend(self, q, k, v, *, causal, mask, scale, return_lse):
        if causal or mask is not None:
            raise UserError("topkeys attends without causality or masks (an encoder's self-attention)")
        if self.config.budget >= k.shape[-2]:
            return exact_attention(q, k, v, scale=scale, return_lse=return_lse)
        idx = self.select(k)
        ks = k.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1]))
        vs = v.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, v.shape[-1]))
        return exact_attention(q, ks, vs, scale=scale, return_lse=return_lse)
