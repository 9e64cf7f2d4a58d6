"""Angular locality-sensitive hashing with buckets laid out in Gray-code order (HyperAttention's sortLSH).

Each row gets `bits` sign bits from random Gaussian hyperplanes. Sorting rows by bucket should put similar
rows next to each other, so neighbouring buckets in the sorted order must be close in Hamming distance: the
buckets are ordered along the reflected Gray code g(i) = i ^ (i >> 1), i.e. bucket code c sits at rank
g⁻¹(c). Consecutive ranks then differ in exactly one bit. (The official code looks the code up in g itself,
which orders buckets by g(c): neighbours there can be several bits apart.)
"""

from __future__ import annotations

import torch


def gray_code(i: torch.Tensor | int):
    """The i-th word of the reflected binary Gray code."""
    return i ^ (i >> 1)


def gray_rank_table(bits: int, device=None) -> torch.Tensor:
    """table[c] = position of bucket code c in the Gray sequence (the inverse Gray map), int64 [2**bits]."""
    i = torch.arange(2**bits, device=device)
    table = torch.empty_like(i)
    table[gray_code(i)] = i
    return table


def projections(dim: int, bits: int, *, generator: torch.Generator | None, device) -> torch.Tensor:
    """`bits` random Gaussian hyperplane normals for rows of width `dim`: float32 [dim, bits]."""
    return torch.randn(dim, bits, generator=generator, device=device, dtype=torch.float32)


def bucket_codes(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Sign pattern of x against the hyperplanes as an integer code: [..., N, D] -> int64 [..., N].

    Signs are taken in float32 at least, so a bf16 run buckets its (rounded) inputs as float32 would."""
    wide = torch.promote_types(x.dtype, torch.float32)
    bits = (torch.matmul(x.to(wide), proj.to(wide)) > 0).to(torch.int64)
    weights = 2 ** torch.arange(proj.shape[1], device=x.device, dtype=torch.int64)
    return (bits * weights).sum(-1)


def bucket_ranks(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Each row's bucket position in Gray order: int64 [..., N] in [0, 2**bits)."""
    table = gray_rank_table(proj.shape[1], device=x.device)
    return table[bucket_codes(x, proj)]


def sort_by_bucket(ranks: torch.Tensor) -> torch.Tensor:
    """Stable sort of rows by bucket rank along the last dim: returns the permutation (sorted -> original)."""
    return torch.sort(ranks, dim=-1, stable=True).indices
