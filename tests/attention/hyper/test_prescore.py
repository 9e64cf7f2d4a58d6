import pytest
import torch

from attnlab.attention.hyper import prescore


def _svd_leverage(k: torch.Tensor) -> tuple[torch.Tensor, int]:
    u, s, _ = torch.linalg.svd(k, full_matrices=False)
    rank = int((s > s.max() * 1e-10).sum())
    return u[:, :rank].pow(2).sum(-1), rank


@pytest.mark.parametrize("rank", [8, 3])
def test_leverage_scores_are_squared_row_norms_of_u_and_sum_to_the_rank(rank):
    g = torch.Generator().manual_seed(rank)
    k = torch.randn(200, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, 8, generator=g, dtype=torch.float64)
    k[7] *= 40  # an outlying key has leverage close to 1
    want, r = _svd_leverage(k)
    assert r == rank
    got = prescore.leverage_scores(k)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    assert abs(float(got.sum()) - rank) < 1e-8
    assert int(got.argmax()) == 7 and 0 <= float(got.min()) and float(got.max()) <= 1 + 1e-9


def test_leverage_is_batched_and_works_from_float32():
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 3, 300, 16, generator=g)
    got = prescore.leverage_scores(k)
    assert got.shape == (2, 3, 300) and got.dtype == torch.float32
    for i in range(2):
        for j in range(3):
            want, _ = _svd_leverage(k[i, j].double())
            torch.testing.assert_close(got[i, j].double(), want, rtol=1e-4, atol=1e-6)


def test_leverage_is_not_the_norm_proxy():
    # Leverage ignores how the key space is scaled; ‖k‖² does not. Stretching one axis changes only the proxy.
    g = torch.Generator().manual_seed(3)
    k = torch.randn(100, 4, generator=g, dtype=torch.float64)
    stretched = k * torch.tensor([10.0, 1, 1, 1], dtype=torch.float64)
    torch.testing.assert_close(prescore.leverage_scores(stretched), prescore.leverage_scores(k))
    assert not torch.allclose(prescore.norm_scores(stretched), prescore.norm_scores(k).float() * 1.0)
    torch.testing.assert_close(prescore.norm_scores(k), k.float().pow(2).sum(-1))
    # The official "leverage" (‖k·W‖² for an orthogonal W) is exactly the norm proxy.
    w, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    torch.testing.assert_close((k @ w).pow(2).sum(-1), k.pow(2).sum(-1))


def _planted(seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[8.0, 0, 0, 0], [0, 8.0, 0, 0], [0, 0, 8.0, 0]])
    pts = torch.cat([c + 0.3 * torch.randn(60, 4, generator=g) for c in centres])
    outliers = torch.tensor([[8.0, 0, 0, 5.0], [0, 5.0, 5.0, 0]])
    return torch.cat([pts, outliers]), g


@pytest.mark.parametrize("median", [False, True])
def test_cluster_scores_rank_outliers_first(median):
    x, g = _planted()
    scores = prescore.cluster_scores(x[None], clusters=3, iters=10, median=median, generator=g)[0]
    top2 = set(scores.topk(2).indices.tolist())
    assert top2 == {180, 181}


def test_cluster_scores_are_shares_of_their_cluster():
    x, g = _planted(1)
    scores = prescore.cluster_scores(x[None], clusters=4, iters=10, generator=g)[0]
    cents = prescore.fit_centroids(x[None], 4, 10, median=False, generator=torch.Generator().manual_seed(9))
    assert cents.shape == (1, 4, 4)
    # Whatever the clustering, scores are non-negative and each cluster's scores sum to 1: total = #clusters used.
    assert float(scores.min()) >= 0
    assert 1 <= round(float(scores.sum())) <= 4 and abs(float(scores.sum()) - round(float(scores.sum()))) < 1e-4


def test_singleton_cluster_scores_one():
    x = torch.tensor([[[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [50.0, 50.0]]])
    scores = prescore.cluster_scores(x, clusters=2, iters=5, generator=torch.Generator().manual_seed(0))
    assert float(scores[0, 3]) == 1.0 and float(scores[0, :3].max()) < 1.0


def test_updates_compute_cluster_means_and_lower_medians():
    x = torch.tensor([[[1.0, 5.0], [3.0, 1.0], [2.0, 9.0], [10.0, 10.0], [12.0, 14.0]]])
    assign = torch.tensor([[0, 0, 0, 1, 1]])
    old = torch.zeros(1, 3, 2)
    mean = prescore._mean_update(x, assign, old)
    torch.testing.assert_close(mean[0, :2], torch.tensor([[2.0, 5.0], [11.0, 12.0]]))
    med = prescore._median_update(x, assign, old)
    torch.testing.assert_close(med[0, :2], torch.tensor([[2.0, 5.0], [10.0, 10.0]]))
    assert torch.equal(mean[0, 2], old[0, 2]) and torch.equal(med[0, 2], old[0, 2])  # empty cluster kept


def test_kmeans_pp_seeds_are_data_points():
    x = torch.randn(3, 50, 4, generator=torch.Generator().manual_seed(4))
    c = prescore.kmeans_pp_init(x, 5, torch.Generator().manual_seed(5))
    for i in range(3):
        d = (c[i][:, None] - x[i][None]).abs().amax(-1).min(-1).values
        assert float(d.max()) == 0.0


def test_key_scores_dispatch_and_subsampled_fit():
    k = torch.randn(1, 2, 500, 8, generator=torch.Generator().manual_seed(6))
    for method in prescore.METHODS:
        s = prescore.key_scores(k, method, clusters=4, iters=3, fit_size=64, generator=torch.Generator().manual_seed(0))
        assert s.shape == (1, 2, 500) and torch.isfinite(s).all()
    with pytest.raises(ValueError):
        prescore.key_scores(k, "kernel", clusters=4, iters=3)


def test_l1_assignment_differs_from_euclidean():
    # The origin is nearer to a = (2, 2) in Euclidean distance (2.83 < 3.5) but nearer to b = (3.5, 0) in L1
    # (3.5 < 4): L1 k-medians must pick b, the Euclidean assignment a.
    x = torch.zeros(1, 1, 2)
    cents = torch.tensor([[[2.0, 2.0], [3.5, 0.0]]])
    dist, assign = prescore.nearest_centroid(x, cents, l1=True)
    assert int(assign) == 1 and float(dist) == 3.5
    dist, assign = prescore.nearest_centroid(x, cents, l1=False)
    assert int(assign) == 0 and abs(float(dist) - 8**0.5) < 1e-6


def test_kmedian_fit_is_a_fixed_point_of_l1_assignment_and_median_update():
    # Overlapping clusters (so L1 and Euclidean assignments disagree on many points): after enough rounds the
    # centroids are the coordinate-wise medians of their L1-nearest members.
    g = torch.Generator().manual_seed(11)
    x = torch.cat([torch.randn(80, 3, generator=g) * torch.tensor([3.0, 0.3, 1.0]) + off
                   for off in (torch.tensor([0.0, 0, 0]), torch.tensor([1.5, 1.0, 0]))])[None]
    cents = prescore.fit_centroids(x, 4, 40, median=True, l1=True, generator=g)
    _, assign = prescore.nearest_centroid(x, cents, l1=True)
    torch.testing.assert_close(prescore._median_update(x, assign, cents), cents, rtol=0, atol=0)
    l1 = torch.cdist(x, cents, p=1).argmin(-1)
    l2 = torch.cdist(x, cents, p=2).argmin(-1)
    assert torch.equal(assign, l1) and not torch.equal(assign, l2)


@pytest.mark.parametrize("l1", [False, True])
def test_kmedian_scores_are_distance_shares_to_median_centroids(l1):
    # The papers' k-median (Euclidean) and textbook k-medians (L1), each through key_scores as hyper calls it.
    x, _ = _planted(2)
    scores = prescore.key_scores(x[None], "kmedian", clusters=3, iters=4, kmedian_l1=l1,
                                 generator=torch.Generator().manual_seed(5))[0]
    # Same seed, no subsampling (n <= fit_size): the same centroids.
    cents = prescore.fit_centroids(x[None], 3, 4, median=True, l1=l1, generator=torch.Generator().manual_seed(5))
    _, assign = prescore.nearest_centroid(x[None], cents, l1=l1)
    torch.testing.assert_close(prescore._median_update(x[None], assign, cents), cents, rtol=0, atol=0)
    dist, assign = torch.cdist(x[None], cents, p=1 if l1 else 2)[0].min(-1)
    total = torch.zeros(3).index_add_(0, assign, dist)
    torch.testing.assert_close(scores, dist / total[assign])


@pytest.mark.parametrize("seed", range(6))
def test_median_update_matches_torch_median_per_cluster(seed):
    g = torch.Generator().manual_seed(seed)
    m, n, d, c = 2, 57 + 13 * seed, 5, 6
    x = torch.randn(m, n, d, generator=g) * 10 ** (seed - 3)
    if seed % 2:
        x = torch.randint(-2, 3, (m, n, d), generator=g).float()  # ties everywhere
    x[0, :, 0] = 7.0  # a constant column
    x[1, 0, 1] = -1e30  # and one that a single value stretches
    assign = torch.randint(0, c - 1, (m, n), generator=g)  # cluster c - 1 stays empty
    old = torch.randn(m, c, d, generator=g)
    got = prescore._median_update(x, assign, old)
    for i in range(m):
        for j in range(c):
            members = x[i, assign[i] == j]
            want = members.median(0).values if len(members) else old[i, j]
            assert torch.equal(got[i, j], want)
