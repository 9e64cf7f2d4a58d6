import dataclasses

import pytest
import torch

from attnlab.attention import AttentionSpec, kernels, registry
from attnlab.attention.exact import ExactAttention, ExactConfig
from attnlab.errors import UserError
from attnlab.models.forecast import ForecastConfig, ForecastTransformer, RevIN, build_forecast_model


def tiny(**kw):
    base = dict(lookback=48, horizon=12, patch_len=8, stride=4, n_layer=2, n_head=2, d_model=16, dropout=0.0)
    base.update(kw)
    return ForecastConfig(**base)


def count_patches(lookback, patch_len, stride, pad_end):
    """Patches the slow way: every start whose patch fits in the (padded) window."""
    length = lookback + (stride if pad_end else 0)
    return len([s for s in range(0, length, stride) if s + patch_len <= length])


@pytest.mark.parametrize("lookback,patch_len,stride,pad_end", [(48, 8, 4, True), (50, 16, 8, False), (16, 16, 3, True),
                                                               (33, 5, 5, False)])
def test_shapes_and_patch_count(lookback, patch_len, stride, pad_end):
    torch.manual_seed(0)
    cfg = tiny(lookback=lookback, patch_len=patch_len, stride=stride, pad_end=pad_end)
    assert cfg.n_patches == count_patches(lookback, patch_len, stride, pad_end)
    model = ForecastTransformer(cfg)
    x, y = torch.randn(5, lookback, 3), torch.randn(5, 12, 3)
    pred = model(x)
    assert pred.shape == (5, 12, 3)
    pred2, loss = model(x, y)
    torch.testing.assert_close(pred2, pred)
    torch.testing.assert_close(loss, ((pred.double() - y.double()) ** 2).mean().float())


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_revin_makes_the_forecast_equivariant_to_scale_and_shift(affine, pos):
    # Each (window, channel) series gets its own a > 0 and b: the forecast must become a·f(x) + b exactly.
    torch.manual_seed(1)
    model = ForecastTransformer(tiny(revin_affine=affine, n_channels=3, pos=pos)).double().eval()
    if affine:  # away from the identity, so the test sees the affine part at work
        with torch.no_grad():
            model.revin.weight.copy_(torch.tensor([0.5, 2.0, -1.5]))
            model.revin.bias.copy_(torch.tensor([0.3, -1.0, 2.0]))
    x = torch.randn(4, 48, 3, dtype=torch.float64)
    a = torch.rand(4, 1, 3, dtype=torch.float64) * 100 + 0.01
    b = torch.randn(4, 1, 3, dtype=torch.float64) * 1000
    torch.testing.assert_close(model(a * x + b), a * model(x) + b, rtol=1e-10, atol=1e-8)


def test_without_revin_the_forecast_is_not_shift_equivariant():
    torch.manual_seed(2)
    model = ForecastTransformer(tiny(revin=False)).double().eval()
    x = torch.randn(2, 48, 1, dtype=torch.float64)
    assert (model(x + 10) - (model(x) + 10)).abs().max() > 1e-3


def test_revin_restores_its_input():
    norm = RevIN(2, affine=True)
    x = torch.randn(3, 20, 2, dtype=torch.float64) * 5 + 7
    z, stats = norm.normalise(x)
    torch.testing.assert_close(z.mean(1), torch.zeros(3, 2, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(norm.denormalise(z, stats), x)


def test_channels_are_independent_and_share_weights():
    torch.manual_seed(3)
    model = ForecastTransformer(tiny()).eval()
    x = torch.randn(2, 48, 3)
    base = model(x)
    changed = x.clone()
    changed[:, :, 1] = torch.randn(2, 48)
    out = model(changed)
    torch.testing.assert_close(out[:, :, [0, 2]], base[:, :, [0, 2]])
    assert (out[:, :, 1] - base[:, :, 1]).abs().max() > 1e-4
    # One channel alone gives the same forecast as inside a batch of channels.
    torch.testing.assert_close(model(x[:, :, 2:3])[:, :, 0], base[:, :, 2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(n for n, e in kernels().items() if e.caps.noncausal))
@pytest.mark.parametrize("transform", ["none", "kv_shift"])
def test_every_noncausal_mechanism_builds_and_trains(name, transform):
    torch.manual_seed(4)
    spec = AttentionSpec(name=name, transform=transform)
    model = ForecastTransformer(tiny(attention=spec, lookback=64))
    x, y = torch.randn(3, 64, 2), torch.randn(3, 12, 2)
    pred, loss = model(x, y)
    assert pred.shape == (3, 12, 2) and torch.isfinite(pred).all()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.embed.weight.grad.abs().sum() > 0


def test_layer_selection_places_the_mechanism():
    model = ForecastTransformer(tiny(n_layer=3, attention=AttentionSpec(name="ssa", layers="last:1")))
    kinds = [type(b.attn.kernel).__name__ for b in model.blocks]
    assert kinds[:2] == ["ExactAttention", "ExactAttention"] and kinds[2] != "ExactAttention"


def test_a_mechanism_without_noncausal_is_refused(monkeypatch):
    entry = registry.Entry("causal_only_fc", ExactConfig, ExactAttention, registry.Capabilities(noncausal=False), "t")
    monkeypatch.setitem(registry._KERNELS, "causal_only_fc", entry)
    with pytest.raises(UserError, match="causal_only_fc.*lacks noncausal"):
        ForecastTransformer(tiny(attention=AttentionSpec(name="causal_only_fc")))


@pytest.mark.parametrize("bad,match", [
    (dict(lookback=4, patch_len=8), "shorter than patch_len"),
    (dict(horizon=0), "horizon"),
    (dict(stride=-1), "stride"),
    (dict(d_model=18, n_head=4), "not divisible"),
    (dict(n_kv_head=3), "multiple of n_kv_head"),
    (dict(dropout=1.0), "dropout"),
    (dict(pos="alibi"), "pos must be one of"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(d_model=12, n_head=4, pos="rope"), "even head dimension"),
    (dict(attention={"name": "nope"}), "unknown attention mechanism"),
    (dict(attention={"nam": "ssa"}), "unknown key"),
])
def test_bad_configs_are_refused_with_one_line(bad, match):
    with pytest.raises(UserError, match=match) as e:
        ForecastTransformer(tiny(**bad))
    assert "\n" not in str(e.value)


def test_wrong_input_shape_is_a_user_error():
    model = ForecastTransformer(tiny())
    with pytest.raises(UserError, match="lookback=48"):
        model(torch.randn(2, 40, 1))
    affine = ForecastTransformer(tiny(revin_affine=True, n_channels=2))
    with pytest.raises(UserError, match="2 channel"):
        affine(torch.randn(2, 48, 3))


def test_rebuilt_from_its_config_record_gives_the_same_forecast():
    torch.manual_seed(5)
    cfg = tiny(attention=AttentionSpec(name="ssa", options={"factor": 2}, transform="kv_shift"))
    model = ForecastTransformer(cfg).eval()
    record = dataclasses.asdict(cfg)  # what the trainer stores with a checkpoint
    again = build_forecast_model("transformer", record)
    again.load_state_dict(model.state_dict())
    again.eval()
    x = torch.randn(2, 48, 1)
    torch.testing.assert_close(again(x), model(x))
    with pytest.raises(UserError, match="unknown forecast model 'arima'"):
        build_forecast_model("arima")
