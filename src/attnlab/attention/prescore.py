"""Key pre-scoring: rank keys by how informative they are, so the best can be attended exactly.

Methods (the paper's, with the official code's faults fixed where they change the meaning):
- "kmeans": cluster the keys (k-means++ init, Lloyd); score = a key's distance to its centroid as a share of
  its cluster's total distance. Outliers and members of small clusters score high.
- "kmedian": the same with coordinate-wise median centroids.
- "leverage": the true statistical leverage score ℓ_i = k_iᵀ (KᵀK)⁺ k_i, the squared row norm of U in the thin
  SVD K = UΣVᵀ (scores sum to rank K). The official "leverage" is ‖k·W‖² for an orthogonal W, i.e. ‖k‖².
- "norm": that cheap proxy, ‖k‖², under its own name.

Every function works on a stack of key matrices [..., N, D] (one per batch element and head).
"""

from __future__ import annotations

import torch

METHODS = ("kmeans", "kmedian", "leverage", "norm")


def norm_scores(k: torch.Tensor) -> torch.Tensor:
    """‖k_i‖²: a proxy for leverage, not a leverage score."""
    return k.float().pow(2).sum(-1)


def leverage_scores(k: torch.Tensor, rtol: float | None = None, chunk: int = 8192) -> torch.Tensor:
    """Statistical leverage of each row of K: [..., N, D] -> float32 [..., N] (float64 for float64 input).

    Computed from the D×D Gram matrix, accumulated in float64 (one pass over the keys), so it costs O(N·D²).
    Directions whose eigenvalue of KᵀK is below rtol·λ_max count as outside the row space; the default rtol
    (1e3·D·ε_float64) sits just above what float64 round-off can produce.
    """
    n, d = k.shape[-2], k.shape[-1]
    rtol = 1e3 * d * torch.finfo(torch.float64).eps if rtol is None else rtol
    gram = torch.zeros(*k.shape[:-2], d, d, dtype=torch.float64, device=k.device)
    for s in range(0, n, chunk):
        kc = k[..., s : s + chunk, :].double()
        gram += kc.mT @ kc
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > rtol * evals[..., -1:].clamp_min(torch.finfo(torch.float64).tiny)
    inv_sqrt = torch.where(keep, evals.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(evals))
    whiten = evecs * inv_sqrt.unsqueeze(-2)  # K @ whiten = U (up to a rotation of its columns)
    # The second pass runs in the keys' own precision (at least float32): its rounding error is ε·‖k‖/σ_min.
    wide = torch.float64 if k.dtype == torch.float64 else torch.float32
    return (k.to(wide) @ whiten.to(wide)).pow(2).sum(-1)


def _sq_dist(x: torch.Tensor, c: torch.Tensor, x_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances [M, N, D] × [M, C, D] -> [M, N, C] through one matmul."""
    x_sq = x.pow(2).sum(-1, keepdim=True) if x_sq is None else x_sq
    return torch.baddbmm(x_sq + c.pow(2).sum(-1).unsqueeze(-2), x, c.mT, alpha=-2).clamp_min_(0)


def kmeans_pp_init(x: torch.Tensor, clusters: int, generator: torch.Generator | None) -> torch.Tensor:
    """k-means++ seeding on a stack of point sets: [M, N, D] -> [M, C, D]."""
    m, n, _ = x.shape
    rows = torch.arange(m, device=x.device)
    x_sq = x.pow(2).sum(-1)
    first = torch.randint(n, (m,), generator=generator, device=x.device)
    cents = [x[rows, first]]
    best = (x_sq - 2 * (x @ cents[0].unsqueeze(-1)).squeeze(-1) + cents[0].pow(2).sum(-1, keepdim=True)).clamp_min(0)
    for _ in range(1, clusters):
        # Draw a point with probability ∝ its squared distance to the nearest seed (inverse CDF of one uniform;
        # a point already chosen has weight 0). All points coinciding: fall back to a uniform pick.
        cdf = torch.cumsum(best, -1)
        total = cdf[:, -1:]
        u = torch.rand(m, 1, generator=generator, device=x.device)
        nxt = torch.where(total[:, 0] > 0, torch.searchsorted(cdf, u * total).squeeze(-1).clamp(max=n - 1),
                          (u[:, 0] * n).long().clamp(max=n - 1))
        c = x[rows, nxt]
        cents.append(c)
        d2 = (x_sq - 2 * (x @ c.unsqueeze(-1)).squeeze(-1) + c.pow(2).sum(-1, keepdim=True)).clamp_min(0)
        best = torch.minimum(best, d2)
    return torch.stack(cents, dim=1)


def _median_update(x: torch.Tensor, assign: torch.Tensor, cents: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise (lower) median of each cluster's members; empty clusters keep their centroid.

    Members are grouped by one sort of the cluster ids, laid out in a NaN-padded [M, C, D, size] block and
    reduced by nanmedian along its last dim (a selection, not a sort of every coordinate)."""
    m, n, d = x.shape
    c = cents.shape[1]
    counts = torch.zeros(m, c, dtype=torch.int64, device=x.device).scatter_add_(1, assign, torch.ones_like(assign))
    size = int(counts.max())
    order = torch.sort(assign, dim=1, stable=True).indices
    grouped = assign.gather(1, order)
    start = torch.cumsum(counts, 1) - counts
    slot = torch.arange(n, device=x.device).expand(m, n) - start.gather(1, grouped)
    block = torch.full((m, c, d, size), float("nan"), dtype=x.dtype, device=x.device)
    rows = torch.arange(m, device=x.device).unsqueeze(1).expand(m, n)
    block[rows, grouped, :, slot] = x.gather(1, order.unsqueeze(-1).expand(m, n, d))
    med = torch.nanmedian(block, dim=-1).values
    return torch.where((counts > 0).unsqueeze(-1), med, cents)


def _mean_update(x: torch.Tensor, assign: torch.Tensor, cents: torch.Tensor) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(assign, cents.shape[1]).to(x.dtype)  # [M, N, C]
    sums = onehot.mT @ x
    counts = onehot.sum(1)
    return torch.where((counts > 0).unsqueeze(-1), sums / counts.clamp_min(1).unsqueeze(-1), cents)


def fit_centroids(x: torch.Tensor, clusters: int, iters: int, *, median: bool,
                  generator: torch.Generator | None) -> torch.Tensor:
    """k-means (or k-median) on a stack of point sets [M, N, D]: k-means++ seeding, then `iters` rounds."""
    cents = kmeans_pp_init(x, clusters, generator)
    x_sq = x.pow(2).sum(-1, keepdim=True)
    for _ in range(iters):
        assign = _sq_dist(x, cents, x_sq).argmin(-1)
        cents = (_median_update if median else _mean_update)(x, assign, cents)
    return cents


def cluster_scores(k: torch.Tensor, clusters: int, iters: int, *, median: bool = False,
                   generator: torch.Generator | None = None, fit_size: int = 1024) -> torch.Tensor:
    """Clustering score of each key: [..., N, D] -> float32 [..., N].

    Centroids are fitted on at most `fit_size` keys drawn uniformly per matrix (the fit then costs the same at
    any length); every key is then assigned to its nearest centroid. A key's score is its distance to that
    centroid divided by the sum of its cluster's distances (1/size when they are all zero, e.g. a singleton).
    """
    lead, (n, d) = k.shape[:-2], k.shape[-2:]
    x = k.reshape(-1, n, d).float()
    m = x.shape[0]
    clusters = max(1, min(clusters, n))
    if n > fit_size:
        pick = torch.rand(m, n, generator=generator, device=x.device).topk(fit_size, dim=-1).indices
        sub = x.gather(1, pick.unsqueeze(-1).expand(m, fit_size, d))
    else:
        sub = x
    cents = fit_centroids(sub, clusters, iters, median=median, generator=generator)
    d2, assign = _sq_dist(x, cents).min(-1)
    dist = d2.sqrt()
    # Per-cluster totals through one bincount over (matrix, cluster) ids.
    flat = (assign + torch.arange(m, device=x.device).unsqueeze(1) * clusters).reshape(-1)
    total = torch.bincount(flat, weights=dist.reshape(-1), minlength=m * clusters).view(m, clusters).to(dist.dtype)
    size = torch.bincount(flat, minlength=m * clusters).view(m, clusters).to(dist.dtype)
    tot, cnt = total.gather(1, assign), size.gather(1, assign)
    score = torch.where(tot > 0, dist / tot.clamp_min(torch.finfo(torch.float32).tiny), 1.0 / cnt)
    return score.reshape(*lead, n)


def key_scores(k: torch.Tensor, method: str, *, clusters: int, iters: int, fit_size: int = 1024,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Score every key by `method` (one of METHODS): [..., N, D] -> [..., N], higher = attend exactly."""
    if method == "kmeans":
        return cluster_scores(k, clusters, iters, median=False, generator=generator, fit_size=fit_size)
    if method == "kmedian":
        return cluster_scores(k, clusters, iters, median=True, generator=generator, fit_size=fit_size)
    if method == "leverage":
        return leverage_scores(k)
    if method == "norm":
        return norm_scores(k)
    raise ValueError(f"unknown pre-scoring method {method!r}; choose one of {', '.join(METHODS)}")
