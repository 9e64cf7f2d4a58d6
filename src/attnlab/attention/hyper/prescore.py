"""Key pre-scoring: rank keys by how informative they are, so the best can be attended exactly.

Methods (the paper's, with the official code's faults fixed where they change the meaning):
- "kmeans": cluster the keys (k-means++ init, Lloyd); score = a key's distance to its centroid as a share of
  its cluster's total distance. Outliers and members of small clusters score high.
- "kmedian": the same with coordinate-wise median centroids. The papers' (and the official code's) k-median
  keeps k-means' Euclidean assignment and score; `l1=True` gives textbook k-medians instead: L1 assignment
  and L1 distance shares, the metric the median is optimal for (about twice as dear on CPU: no matmul
  computes an L1 distance). Seeding is k-means++ for both.
- "leverage": the true statistical leverage score ℓ_i = k_iᵀ (KᵀK)⁺ k_i, the squared row norm of U in the thin
  SVD K = UΣVᵀ (scores sum to rank K). The official "leverage" is ‖k·W‖² for an orthogonal W, i.e. ‖k‖².
- "norm": that cheap proxy, ‖k‖², under its own name.

Every function works on a stack of key matrices [..., N, D] (one per batch element and head).
"""

from __future__ import annotations

from functools import partial

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


def _l1_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """L1 distances [M, N, D] × [M, C, D] -> [M, N, C].

    No matmul computes an exact L1 distance. cdist's CPU kernel is a scalar loop (~0.45 ns per coordinate
    difference on the benchmark machine), yet it beats every eager alternative tried (broadcast sums, per-
    coordinate accumulation, rank tables + embedding_bag): those are memory-bound. This is the main cost of
    k-medians; see BENCHMARKS.md."""
    return torch.cdist(x, c, p=1)


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


def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 in [0, 2**32) with the same order (IEEE bits, negatives flipped)."""
    v = x.view(torch.int32).long()
    return torch.where(v < 0, v ^ 0x7FFFFFFF, v) + 2**31


class _MedianSelect:
    """Coordinate-wise (lower) medians of clusters of one stack of points [M, N, D], for any assignment.

    A selection per (cluster, coordinate) row (kthvalue, nanmedian on a padded block) costs about a
    microsecond per row in torch, and sorting is ~50 ns per value, so all medians are found at once by a
    histogram select made of vectorised passes:
    1. every value falls into one of B equal-width bins of its column's range (monotone in the value; fixed
       by the points, so computed once for every round of a fit; B = 32, fewer when clusters are so small
       that the histograms would outgrow the points);
    2. per (matrix, cluster, coordinate) cell, a histogram and its running sum give the bin holding the
       median and the median's rank among that bin's values;
    3. only the values of those bins (a few per cell) are sorted, by (cell, value), and read at that rank.
    The result is a member's value, bit for bit what torch.median gives per cluster and coordinate (other
    dtypes are rounded to float32 first, as cluster_scores does anyway).
    """

    def __init__(self, x: torch.Tensor, clusters: int):
        self.x = x.float().contiguous()
        m, n, d = self.x.shape
        bins = max(1, min(32, n // clusters))
        lo, hi = self.x.amin(1, keepdim=True), self.x.amax(1, keepdim=True)
        scale = bins / (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
        b = ((self.x - lo) * scale).long().clamp_(0, bins - 1)
        self.bins = bins
        self.slot = b + torch.arange(d, device=x.device) * bins  # (coordinate, bin) within a cluster's cells
        self.b = b.view(m * n, d)

    def __call__(self, assign: torch.Tensor, cents: torch.Tensor) -> torch.Tensor:
        x, bins = self.x, self.bins
        m, n, d = x.shape
        c = cents.shape[1]
        grp = torch.arange(m, device=x.device).unsqueeze(1) * c + assign  # [M, N]: (matrix, cluster)
        counts = torch.bincount(grp.view(-1), minlength=m * c)
        key = (grp.unsqueeze(-1) * (d * bins) + self.slot).view(-1)  # cell * bins + bin
        hist = torch.bincount(key, minlength=m * c * d * bins).view(m * c * d, bins)
        cum = hist.cumsum(-1)
        rank = ((counts - 1).clamp_min(0) // 2).repeat_interleave(d)  # the lower median's rank in its cell
        target = torch.searchsorted(cum, rank.unsqueeze(-1), right=True).clamp_(max=bins - 1)  # first cum > rank
        upto = cum.gather(1, target).squeeze(-1)
        inside = hist.gather(1, target).squeeze(-1)
        # A value is a candidate when it sits in its cell's target bin (rows of D gathered per point).
        hit = self.b == target.view(m * c, d).index_select(0, grp.view(-1))
        idx = hit.view(-1).nonzero().squeeze(-1)
        vals = x.view(-1)[idx]
        order = ((key[idx] // bins) * 2**32 + _ordered_bits(vals)).sort().indices
        start = torch.cumsum(inside, 0) - inside  # where each cell's values begin in the sorted list
        # An empty cluster's cell reads some other value (clamped), discarded by the final where.
        pos = (start + rank - (upto - inside)).clamp_(0, idx.numel() - 1)
        med = vals[order[pos]].view(m, c, d).to(cents.dtype)
        return torch.where((counts > 0).view(m, c, 1), med, cents)


def _median_update(x: torch.Tensor, assign: torch.Tensor, cents: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise (lower) median of each cluster's members; empty clusters keep their centroid."""
    return _MedianSelect(x, cents.shape[1])(assign, cents)


def _mean_update(x: torch.Tensor, assign: torch.Tensor, cents: torch.Tensor) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(assign, cents.shape[1]).to(x.dtype)  # [M, N, C]
    sums = onehot.mT @ x
    counts = onehot.sum(1)
    return torch.where((counts > 0).unsqueeze(-1), sums / counts.clamp_min(1).unsqueeze(-1), cents)


def nearest_centroid(x: torch.Tensor, cents: torch.Tensor, *, l1: bool = False,
                     x_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to the nearest centroid and its index, [M, N] each: Euclidean, or L1."""
    if l1:
        return _l1_dist(x, cents).min(-1)
    d2, assign = _sq_dist(x, cents, x_sq).min(-1)
    return d2.sqrt(), assign


def fit_centroids(x: torch.Tensor, clusters: int, iters: int, *, median: bool, l1: bool = False,
                  generator: torch.Generator | None) -> torch.Tensor:
    """k-means (or k-median) on a stack of point sets [M, N, D]: k-means++ seeding, then `iters` rounds of
    nearest-centroid assignment (Euclidean, or L1) and mean (or coordinate-wise median) update."""
    cents = kmeans_pp_init(x, clusters, generator)
    x_sq = None if l1 else x.pow(2).sum(-1, keepdim=True)
    update = _MedianSelect(x, clusters) if median else partial(_mean_update, x)
    for _ in range(iters):
        assign = nearest_centroid(x, cents, l1=l1, x_sq=x_sq)[1]
        cents = update(assign, cents)
    return cents


def cluster_scores(k: torch.Tensor, clusters: int, iters: int, *, median: bool = False, l1: bool = False,
                   generator: torch.Generator | None = None, fit_size: int = 1024) -> torch.Tensor:
    """Clustering score of each key: [..., N, D] -> float32 [..., N].

    Centroids are fitted on at most `fit_size` keys drawn uniformly per matrix (the fit then costs the same at
    any length); every key is then assigned to its nearest centroid (Euclidean, or L1). A key's score is its
    distance to that centroid divided by the sum of its cluster's distances (1/size when they are all zero,
    e.g. a singleton).
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
    cents = fit_centroids(sub, clusters, iters, median=median, l1=l1, generator=generator)
    dist, assign = nearest_centroid(x, cents, l1=l1)
    # Per-cluster totals through one bincount over (matrix, cluster) ids.
    flat = (assign + torch.arange(m, device=x.device).unsqueeze(1) * clusters).reshape(-1)
    total = torch.bincount(flat, weights=dist.reshape(-1), minlength=m * clusters).view(m, clusters).to(dist.dtype)
    size = torch.bincount(flat, minlength=m * clusters).view(m, clusters).to(dist.dtype)
    tot, cnt = total.gather(1, assign), size.gather(1, assign)
    score = torch.where(tot > 0, dist / tot.clamp_min(torch.finfo(torch.float32).tiny), 1.0 / cnt)
    return score.reshape(*lead, n)


def key_scores(k: torch.Tensor, method: str, *, clusters: int, iters: int, fit_size: int = 1024,
               kmedian_l1: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Score every key by `method` (one of METHODS): [..., N, D] -> [..., N], higher = attend exactly.
    kmedian_l1: k-median by L1 distance (textbook k-medians) instead of the papers' Euclidean one."""
    if method in ("kmeans", "kmedian"):
        median = method == "kmedian"
        return cluster_scores(k, clusters, iters, median=median, l1=median and kmedian_l1, generator=generator,
                              fit_size=fit_size)
    if method == "leverage":
        return leverage_scores(k)
    if method == "norm":
        return norm_scores(k)
    raise ValueError(f"unknown pre-scoring method {method!r}; choose one of {', '.join(METHODS)}")
