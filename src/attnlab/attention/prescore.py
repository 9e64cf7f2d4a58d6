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

    Computed from the D×D Gram matrix in float64 (cheap: one pass over the keys), so it costs O(N·D²).
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
    out_dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    parts = [(k[..., s : s + chunk, :].double() @ whiten).pow(2).sum(-1).to(out_dtype) for s in range(0, n, chunk)]
    return torch.cat(parts, dim=-1) if parts else torch.zeros(k.shape[:-1], dtype=out_dtype, device=k.device)


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [M, N, D] × [M, C, D] -> [M, N, C] through one matmul."""
    d2 = x.pow(2).sum(-1, keepdim=True) - 2 * x @ c.mT + c.pow(2).sum(-1).unsqueeze(-2)
    return d2.clamp_min(0)


def kmeans_pp_init(x: torch.Tensor, clusters: int, generator: torch.Generator | None) -> torch.Tensor:
    """k-means++ seeding on a stack of point sets: [M, N, D] -> [M, C, D]."""
    m, n, _ = x.shape
    rows = torch.arange(m, device=x.device)
    first = torch.randint(n, (m,), generator=generator, device=x.device)
    cents = [x[rows, first]]
    best = (x - cents[0].unsqueeze(1)).pow(2).sum(-1)
    for _ in range(1, clusters):
        # A point already chosen has weight 0; the tiny floor keeps multinomial valid when all points coincide.
        nxt = torch.multinomial(best + 1e-30, 1, generator=generator).squeeze(-1)
        cents.append(x[rows, nxt])
        best = torch.minimum(best, (x - cents[-1].unsqueeze(1)).pow(2).sum(-1))
    return torch.stack(cents, dim=1)


def _median_update(x: torch.Tensor, assign: torch.Tensor, cents: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise (lower) median of each cluster's members; empty clusters keep their centroid."""
    m, n, d = x.shape
    c = cents.shape[1]
    span = 2 * (x.abs().amax() + 1).double()
    # Sorting cluster·span + value groups each cluster's values together, in ascending order.
    key = assign.double().unsqueeze(-1) * span + x.double()
    vals = torch.sort(key, dim=1).values - assign.sort(dim=1).values.double().unsqueeze(-1) * span
    counts = torch.zeros(m, c, dtype=torch.int64, device=x.device).scatter_add_(1, assign, torch.ones_like(assign))
    start = torch.cumsum(counts, 1) - counts
    mid = (start + (counts - 1).clamp_min(0) // 2).clamp(max=n - 1)
    med = vals.gather(1, mid.unsqueeze(-1).expand(m, c, d)).to(x.dtype)
    return torch.where((counts > 0).unsqueeze(-1), med, cents)


def _mean_update(x: torch.Tensor, assign: torch.Tensor, cents: torch.Tensor) -> torch.Tensor:
    m, n, d = x.shape
    c = cents.shape[1]
    sums = torch.zeros(m, c, d, dtype=x.dtype, device=x.device).scatter_add_(1, assign.unsqueeze(-1).expand(m, n, d), x)
    counts = torch.zeros(m, c, dtype=x.dtype, device=x.device).scatter_add_(1, assign, torch.ones_like(x[..., 0]))
    return torch.where((counts > 0).unsqueeze(-1), sums / counts.clamp_min(1).unsqueeze(-1), cents)


def fit_centroids(x: torch.Tensor, clusters: int, iters: int, *, median: bool,
                  generator: torch.Generator | None) -> torch.Tensor:
    """k-means (or k-median) on a stack of point sets [M, N, D]: k-means++ seeding, then `iters` rounds."""
    cents = kmeans_pp_init(x, clusters, generator)
    for _ in range(iters):
        assign = _sq_dist(x, cents).argmin(-1)
        cents = (_median_update if median else _mean_update)(x, assign, cents)
    return cents


def cluster_scores(k: torch.Tensor, clusters: int, iters: int, *, median: bool = False,
                   generator: torch.Generator | None = None, fit_size: int = 4096) -> torch.Tensor:
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
    total = torch.zeros(m, clusters, device=x.device).scatter_add_(1, assign, dist)
    size = torch.zeros(m, clusters, device=x.device).scatter_add_(1, assign, torch.ones_like(dist))
    tot, cnt = total.gather(1, assign), size.gather(1, assign)
    score = torch.where(tot > 0, dist / tot.clamp_min(torch.finfo(torch.float32).tiny), 1.0 / cnt)
    return score.reshape(*lead, n)


def key_scores(k: torch.Tensor, method: str, *, clusters: int, iters: int, fit_size: int = 4096,
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
