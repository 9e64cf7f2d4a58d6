"""generate(): greedy and sampled decoding with and without the KV cache."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from attnlab.errors import UserError
from attnlab.inference import generate
from attnlab.models.lm import LM, LMConfig

V = 29


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    model = LM(LMConfig(**(dict(vocab_size=V, n_layer=2, n_head=4, d_model=32, max_seq_len=40) | kw)))
    with torch.no_grad():
        # An untrained model is nearly uniform; larger tied embeddings give it clear preferences, so a
        # greedy choice is never decided by rounding.
        model.embed.weight.mul_(5)
    return model


def _prompt(b=3, n=5, seed=1):
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=2, pos="learned")], ids=["rope", "learned_gqa"])
def test_greedy_with_cache_equals_without(kw):
    model = _model(**kw)
    p = _prompt()
    a = generate(model, p, 20, temperature=0)
    b = generate(model, p, 20, temperature=0, use_cache=False)
    assert a.shape == (3, 25) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], p)
    assert len({tuple(r) for r in a[:, 5:].tolist()}) > 1  # the rows really differ: the batch is not degenerate


def test_greedy_is_the_argmax_of_the_full_forward():
    model = _model().eval()
    out = generate(model, _prompt(), 6, temperature=0)
    with torch.no_grad():
        logits = model(out[:, :-1])
    torch.testing.assert_close(logits[:, 4:].argmax(-1), out[:, 5:], rtol=0, atol=0)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=5, top_p=1e-6)])
def test_truncated_sampling_to_one_token_is_greedy(kw):
    model = _model()
    p = _prompt()
    greedy = generate(model, p, 12, temperature=0)
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(generate(model, p, 12, temperature=1.5, generator=g, **kw), greedy)


def test_seeded_sampling_is_reproducible_and_seeds_matter():
    model = _model()
    p = _prompt()

    def draw(seed, **kw):
        return generate(model, p, 15, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(draw(7), draw(7))
    assert torch.equal(draw(7, use_cache=False), draw(7))
    assert not torch.equal(draw(7), draw(8))
    assert not torch.equal(draw(7), generate(model, p, 15, temperature=0))


def test_stop_tokens_stop_rows_and_pad_them():
    model = _model()
    p = _prompt(b=4)
    free = generate(model, p, 16, temperature=0)
    stop = int(free[0, 5 + 3])  # row 0 emits this at its 4th new token (or earlier)
    out = generate(model, p, 16, temperature=0, stop_tokens=[stop])
    for r in range(4):
        new, ref = out[r, 5:], free[r, 5:]
        hits = (ref == stop).nonzero()
        if len(hits) == 0:
            assert torch.equal(new, ref[: len(new)])
            continue
        first = int(hits[0])
        assert torch.equal(new[: first + 1], ref[: first + 1])  # same tokens up to and with the stop token
        assert (new[first:] == stop).all()  # then padded with it
    assert int((out[0, 5:] == stop).nonzero()[0]) <= 3
    # A stop token inside the prompt does not count.
    in_prompt_only = [t for t in p[0].tolist() if t not in free[0, 5:].tolist()]
    assert in_prompt_only, "pick another prompt seed: every prompt token recurs in the continuation"
    assert torch.equal(generate(model, p[:1], 16, temperature=0, stop_tokens=in_prompt_only[:1])[0], free[0])


def test_generation_ends_when_every_row_has_stopped():
    model = _model()
    p = _prompt(b=3)
    free = generate(model, p, 10, temperature=0)
    firsts = free[:, 5].tolist()
    out = generate(model, p, 10, temperature=0, stop_tokens=firsts)
    assert out.shape == (3, 6) and torch.equal(out, free[:, :6])
    # With several stop tokens, each row is padded with the one it emitted.
    out = generate(model, p, 10, temperature=0, stop_tokens=[firsts[0], int(free[1, 7])])
    assert (out[0, 5:] == firsts[0]).all()


def test_over_long_requests_are_refused_before_running():
    model = _model(max_seq_len=12)
    with pytest.raises(UserError, match="max_seq_len=12"):
        generate(model, _prompt(n=5), 8)
    with pytest.raises(UserError, match="max_seq_len"):
        generate(model, _prompt(n=13), 0)
    assert generate(model, _prompt(n=5), 7, temperature=0).shape == (3, 12)  # exactly the limit is fine


@pytest.mark.parametrize(
    "kw",
    [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(stop_tokens=[V]),
     dict(max_new_tokens=-1)],
)
def test_bad_arguments_are_refused(kw):
    model = _model()
    n = kw.pop("max_new_tokens", 3)
    with pytest.raises(UserError):
        generate(model, _prompt(), n, **kw)
    with pytest.raises(UserError):
        generate(model, torch.zeros(4, dtype=torch.long), 3)
    with pytest.raises(UserError):
        generate(model, torch.zeros(1, 3), 3)


def test_zero_new_tokens_returns_the_prompt():
    p = _prompt()
    out = generate(_model(), p, 0)
    assert torch.equal(out, p) and out is not p


def test_training_flag_is_restored_and_dropout_is_off_while_generating():
    model = _model(dropout=0.5).train()
    p = _prompt()
    a = generate(model, p, 10, temperature=0)
    assert model.training
    b = generate(model, p, 10, temperature=0, use_cache=False)
    assert torch.equal(a, b)


class _FixedLogits(nn.Module):
    """A stand-in model whose next-token logits never change: sampling statistics are then exact."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.cfg = SimpleNamespace(vocab_size=len(logits), max_seq_len=8)
        self.calls = 0

    def new_cache(self):
        return []

    def forward(self, idx, cache=None):
        self.calls += 1
        return self.logits.expand(idx.shape[0], idx.shape[1], -1)


PROBS = torch.tensor([0.45, 0.25, 0.15, 0.1, 0.05])


@pytest.mark.parametrize(
    "kw, kept",
    [(dict(), [0, 1, 2, 3, 4]), (dict(top_k=2), [0, 1]), (dict(top_p=0.6), [0, 1]), (dict(top_p=0.8), [0, 1, 2]),
     (dict(top_k=2, top_p=0.99), [0, 1]), (dict(top_k=4, top_p=0.5), [0, 1])],
)
def test_sampling_frequencies_follow_the_truncated_softmax(kw, kept):
    # Tokens listed in a shuffled order: the filter must work on probabilities, not on token ids.
    perm = torch.tensor([3, 0, 4, 1, 2])
    model = _FixedLogits(PROBS.log()[perm.argsort()])
    n = 6000
    out = generate(model, torch.zeros(n, 1, dtype=torch.long), 1, generator=torch.Generator().manual_seed(0), **kw)
    counts = torch.bincount(out[:, 1], minlength=5).double()
    want = torch.zeros(5, dtype=torch.float64)
    want[perm[kept]] = PROBS[kept].double() / PROBS[kept].sum()
    assert (counts[want == 0] == 0).all(), counts
    # Four standard deviations of a binomial count: fails by chance about once in 10^4 runs, for a fixed seed never.
    sd = (n * want * (1 - want)).sqrt()
    assert ((counts - n * want).abs() <= 4 * sd + 1).all(), (counts / n, want)


def test_temperature_sharpens_and_flattens():
    model = _FixedLogits(PROBS.log())
    n = 4000

    def top_share(t):
        out = generate(model, torch.zeros(n, 1, dtype=torch.long), 1, temperature=t,
                       generator=torch.Generator().manual_seed(1))
        return (out[:, 1] == 0).double().mean().item()

    p = PROBS.double()
    for t in (0.5, 2.0):
        want = (p ** (1 / t) / (p ** (1 / t)).sum())[0].item()
        assert abs(top_share(t) - want) < 4 * (want * (1 - want) / n) ** 0.5 + 1e-3


def test_cached_generation_feeds_one_token_per_step():
    model = _FixedLogits(PROBS.log())
    generate(model, torch.zeros(2, 1, dtype=torch.long), 5, temperature=0)
    assert model.calls == 5  # the prefill plus one call per token, none after the last one


def test_sliding_window_generation_runs_past_the_context_and_matches_the_uncached_path():
    torch.manual_seed(0)
    model = LM(LMConfig(vocab_size=17, n_layer=2, n_head=2, d_model=32, max_seq_len=16))
    prompt = torch.randint(0, 17, (2, 5))
    with pytest.raises(UserError, match="max_seq_len"):
        generate(model, prompt, 40, temperature=0)
    cached = generate(model, prompt, 40, temperature=0, sliding_window=True)
    assert cached.shape == (2, 45)
    # The cached path restarts from half a context; the reference recomputes over the last 16 tokens at every
    # step. They agree up to the first restart and each step conditions on at most max_seq_len tokens.
    ref = generate(model, prompt, 11, temperature=0, use_cache=False, sliding_window=True)
    assert torch.equal(cached[:, :16], ref[:, :16])
    long_prompt = torch.randint(0, 17, (1, 17))
    with pytest.raises(UserError, match="max_seq_len"):
        generate(model, long_prompt, 1, temperature=0, sliding_window=True)
