import torch

from attnlab.attention.hyper import lsh


def _hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def test_gray_order_puts_one_bit_between_neighbouring_buckets():
    for bits in range(1, 9):
        table = lsh.gray_rank_table(bits)
        assert sorted(table.tolist()) == list(range(2**bits))  # a permutation of the codes
        by_rank = torch.argsort(table).tolist()  # code at each rank
        assert all(_hamming(a, b) == 1 for a, b in zip(by_rank, by_rank[1:]))


def test_the_official_lookup_direction_is_not_a_gray_order():
    # The official code ranks code c by g(c) instead of g^-1(c): neighbours can then be several bits apart.
    codes = torch.arange(2**7)
    by_rank = torch.argsort(lsh.gray_code(codes)).tolist()
    worst = max(_hamming(a, b) for a, b in zip(by_rank, by_rank[1:]))
    assert worst == 4


def test_codes_are_sign_patterns_and_ignore_positive_scale():
    g = torch.Generator().manual_seed(0)
    proj = lsh.projections(16, 6, generator=g, device="cpu")
    x = torch.randn(5, 16, generator=g)
    codes = lsh.bucket_codes(x, proj)
    signs = (x @ proj > 0).long()
    assert torch.equal(codes, (signs * 2 ** torch.arange(6)).sum(-1))
    assert torch.equal(lsh.bucket_codes(3.7 * x, proj), codes)
    assert torch.equal(lsh.bucket_codes(-x, proj), (2**6 - 1) - codes)  # every sign flips


def test_similar_rows_share_buckets_more_often_than_random_rows():
    g = torch.Generator().manual_seed(1)
    proj = lsh.projections(32, 7, generator=g, device="cpu")
    x = torch.randn(2000, 32, generator=g)
    near = x + 0.1 * torch.randn(2000, 32, generator=g)
    far = torch.randn(2000, 32, generator=g)
    same_near = (lsh.bucket_ranks(x, proj) == lsh.bucket_ranks(near, proj)).float().mean()
    same_far = (lsh.bucket_ranks(x, proj) == lsh.bucket_ranks(far, proj)).float().mean()
    assert same_near > 0.6 and same_far < 0.05


def test_sort_is_stable_within_a_bucket():
    ranks = torch.tensor([[3, 1, 3, 0, 1, 3]])
    assert lsh.sort_by_bucket(ranks).tolist() == [[3, 1, 4, 0, 2, 5]]
