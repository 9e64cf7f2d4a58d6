"""HyperAttention on padded batches: real tokens' outputs do not depend on the padding's content or amount."""

import pytest
import torch

from attnlab.attention import reference_attention
from attnlab.attention.hyper import HyperConfig, hyper_attention

# Approximates at these lengths (blocks of 16, exact only up to 32 keys); pre-scoring picks 12 keys.
SMALL = dict(block_size=16, sample_size=16, min_seq_len=32, lsh_bits=4, top_k=12, clusters=3)
PRESCORE = ["none", "kmeans", "kmedian", "leverage", "norm"]
LENGTHS = (150, 118)  # real tokens of the two sequences


def _seqs(hq=4, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(hq, n, d, generator=g), torch.randn(hkv, n, d, generator=g),
             torch.randn(hkv, n, d, generator=g)) for n in LENGTHS]


def _pad(seqs, layout, seed):
    """Batch the sequences: layout[i] = (pads before, pads after); pad rows hold large random values."""
    g = torch.Generator().manual_seed(seed)
    n = max(before + len_ + after for (before, after), len_ in zip(layout, LENGTHS))
    qs, ks, vs, valid = [], [], [], torch.zeros(len(seqs), n, dtype=torch.bool)
    for i, ((q, k, v), (before, after)) in enumerate(zip(seqs, layout)):
        assert before + q.shape[1] + after == n

        def fill(x):
            junk = 50 * torch.randn(x.shape[0], n, x.shape[2], generator=g)
            junk[:, before : before + x.shape[1]] = x
            return junk

        qs.append(fill(q)), ks.append(fill(k)), vs.append(fill(v))
        valid[i, before : before + q.shape[1]] = True
    return torch.stack(qs), torch.stack(ks), torch.stack(vs), valid


def _real_rows(o, valid):
    return [o[i][:, valid[i]] for i in range(o.shape[0])]


@pytest.mark.parametrize("prescore", PRESCORE)
@pytest.mark.parametrize("causal", [False, True])
def test_real_outputs_ignore_pad_content_and_amount(prescore, causal):
    cfg = HyperConfig(**{**SMALL, "sample_size": 16 if prescore == "none" else 8}, prescore=prescore)
    seqs = _seqs()
    # Left padding, right padding and padding on both sides, at two batch lengths; same seed every call.
    layouts = [((20, 0), (0, 52)), ((0, 40), (30, 42)), ((7, 13), (2, 50))]
    outs = []
    for j, layout in enumerate(layouts):
        q, k, v, valid = _pad(seqs, layout, seed=j)
        o, lse = hyper_attention(q, k, v, cfg, causal=causal, mask=valid[:, None, None, :])
        outs.append((_real_rows(o, valid), _real_rows(lse.unsqueeze(-1), valid)))
    # Changing only the pad contents (same layout, other junk):
    q, k, v, valid = _pad(seqs, layouts[0], seed=99)
    o, lse = hyper_attention(q, k, v, cfg, causal=causal, mask=valid[:, None, None, :])
    outs.append((_real_rows(o, valid), _real_rows(lse.unsqueeze(-1), valid)))
    for i, (qs, ks, vs) in enumerate(seqs):
        # Each real row equals the unpadded sequence alone, under the same seed.
        alone, alone_lse = hyper_attention(qs[None], ks[None], vs[None], cfg, causal=causal)
        exact = reference_attention(qs[None], ks[None], vs[None], causal=causal)
        # The check can fail: the approximation is active at these lengths.
        assert (alone - exact).norm() > 1e-2 * exact.norm()
        for o, lse in outs:
            torch.testing.assert_close(o[i], alone[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse[i].squeeze(-1), alone_lse[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_padded_rows_get_what_the_mask_asks_and_exactness_holds(causal):
    """With min_seq_len above the length the kernel is exact: every row, padded queries included, must equal
    the reference under the same mask (a causal left-pad query sees no key: o = 0, lse = -inf)."""
    q, k, v, valid = _pad(_seqs(), ((20, 10), (0, 62)), seed=1)
    mask = valid[:, None, None, :]
    o, lse = hyper_attention(q, k, v, HyperConfig(min_seq_len=1000), causal=causal, mask=mask)
    ro, rlse = reference_attention(q.double(), k.double(), v.double(), causal=causal, mask=mask, return_lse=True)
    torch.testing.assert_close(o.double(), ro, rtol=1e-4, atol=1e-4)
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse.double()[fin], rlse[fin], rtol=1e-4, atol=1e-4)


def test_cross_attention_keys_are_compacted_and_every_query_answered():
    """Fewer queries than keys, non-causal: no query is padding; the keys' padding still changes nothing."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 90, 8, generator=g)
    seqs = [(q[i], *_seqs(hq=2, hkv=2, seed=4)[i][1:]) for i in range(2)]
    cfg = HyperConfig(**SMALL)
    results = []
    for layout, seed in ((((20, 0), (0, 52))), 0), ((((0, 40), (30, 42))), 1):
        _, k, v, valid = _pad([(s[1], s[1], s[2]) for s in seqs], layout, seed=seed)
        o, _ = hyper_attention(q, k, v, cfg, causal=False, mask=valid[:, None, None, :])
        results.append(o)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
    assert bool((results[0].abs().sum(-1) > 0).all())


def test_gradients_reach_real_tokens_only():
    seqs = _seqs(hq=2, hkv=2)
    q, k, v, valid = _pad(seqs, ((20, 0), (0, 52)), seed=0)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o, _ = hyper_attention(q, k, v, HyperConfig(**{**SMALL, "sample_size": 8}, prescore="kmeans"), causal=True,
                           mask=valid[:, None, None, :])
    o[valid[:, None, :, None].expand_as(o)].sum().backward()
    pad = ~valid
    for x in (q, k, v):
        assert float(x.grad.transpose(1, 2)[pad].abs().max()) == 0.0
        assert float(x.grad.transpose(1, 2)[valid].abs().max()) > 0.0
