"""The registry: names, options, capabilities, layer selection and attention modes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from attnlab.attention import (
    AttentionSpec, Capabilities, Kernel, build_kernel, exact_attention, kernels, register_kernel, select_layers,
    set_attention_mode,
)
from attnlab.attention import registry
from attnlab.attention.registry import make_config
from attnlab.errors import UserError
from attnlab.models.lm import LM, LMConfig


@dataclass
class _ToyConfig:
    blocks: int = 2
    rate: float = 0.5
    flag: bool = False
    kind: Literal["a", "b"] = "a"
    limit: int | None = None
    names: list[str] | None = None


class _ToyKernel(Kernel):
    """A deterministic test kernel: exact attention with its output scaled by 2 (so modes are visible)."""

    def attend(self, q, k, v, *, causal, mask, scale, return_lse):
        out = exact_attention(q, k, v, causal=causal, mask=mask, scale=scale)
        return 2 * out


@pytest.fixture
def toy_kernel():
    """Register throwaway kernels for one test and always take them out of the registry again."""
    added = []

    def add(name, caps=Capabilities(), cls=_ToyKernel, config=_ToyConfig):
        register_kernel(name, config, caps, "test kernel")(cls)
        added.append(name)
        return name

    try:
        yield add
    finally:
        for name in added:
            registry._KERNELS.pop(name, None)
    assert not any(n.startswith("_test") for n in kernels())


def test_exact_is_registered_and_builds():
    assert "exact" in kernels()
    k = build_kernel("exact", {}, need={"causal": True})
    assert isinstance(k, Kernel)


def test_unknown_mechanism_lists_the_valid_choices():
    with pytest.raises(UserError) as e:
        build_kernel("no_such_attention")
    msg = str(e.value)
    assert "no_such_attention" in msg and "exact" in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match="exact"):
        LM(LMConfig(vocab_size=16, n_layer=1, d_model=16, n_head=2, attention=AttentionSpec(name="nope")))


def test_unknown_option_is_refused_and_names_the_valid_ones(toy_kernel):
    with pytest.raises(UserError, match="bogus"):
        build_kernel("exact", {"bogus": 1})
    name = toy_kernel("_test_toy")
    with pytest.raises(UserError) as e:
        build_kernel(name, {"blockz": 3})
    assert "blockz" in str(e.value) and "blocks" in str(e.value)


@pytest.mark.parametrize(
    "options",
    [{"blocks": "2"}, {"blocks": 2.5}, {"blocks": True}, {"rate": "fast"}, {"flag": 1}, {"kind": "c"},
     {"limit": "x"}, {"names": "abc"}],
)
def test_wrong_option_types_are_refused(toy_kernel, options):
    name = toy_kernel("_test_toy")
    with pytest.raises(UserError) as e:
        build_kernel(name, options)
    assert next(iter(options)) in str(e.value)


def test_options_are_coerced_into_the_config(toy_kernel):
    name = toy_kernel("_test_toy")
    k = build_kernel(name, {"blocks": 3, "rate": 1, "flag": True, "kind": "b", "limit": None, "names": ("x",)})
    assert k.config == _ToyConfig(blocks=3, rate=1.0, flag=True, kind="b", limit=None, names=["x"])
    assert isinstance(k.config.rate, float)
    assert make_config(_ToyConfig, {"limit": 4}, "toy").limit == 4


def test_registering_a_name_twice_is_an_error(toy_kernel):
    toy_kernel("_test_twice")
    with pytest.raises(ValueError):
        register_kernel("_test_twice", _ToyConfig)(_ToyKernel)


def test_capability_refusal_when_the_lm_is_built(toy_kernel):
    name = toy_kernel("_test_noncausal_only", Capabilities(causal=False))
    with pytest.raises(UserError) as e:  # refused when the config is made, before any model exists
        LM(LMConfig(vocab_size=16, n_layer=2, d_model=16, n_head=2, attention=AttentionSpec(name=name)))
    msg = str(e.value)
    assert name in msg and "causal" in msg and "exact" in msg  # says what is missing and who can do it
    # Restricted to no layer, the model builds: the check is per layer that actually runs the kernel.
    LM(LMConfig(vocab_size=16, n_layer=2, d_model=16, n_head=2, attention=AttentionSpec(name=name, layers="none")))


def test_capable_toy_kernel_runs_in_the_selected_layers_only(toy_kernel):
    name = toy_kernel("_test_toy")
    cfg = LMConfig(vocab_size=16, n_layer=3, d_model=16, n_head=2,
                   attention=AttentionSpec(name=name, options={"blocks": 4}, layers="last:2"))
    model = LM(cfg)
    kinds = [type(b.attn.kernel).__name__ for b in model.blocks]
    assert kinds == ["ExactAttention", "_ToyKernel", "_ToyKernel"]
    assert model.blocks[1].attn.kernel.config.blocks == 4


@pytest.mark.parametrize(
    "spec, expected",
    [("all", [0, 1, 2, 3, 4]), ("none", []), ("odd", [1, 3]), ("even", [0, 2, 4]), ("first:2", [0, 1]),
     ("last:2", [3, 4]), ("first:5", [0, 1, 2, 3, 4]), ("last:0", []), ("0,3", [0, 3]), (" 4, 1 ,1", [1, 4]),
     ("2", [2]), ("ALL", [0, 1, 2, 3, 4])],
)
def test_select_layers(spec, expected):
    assert select_layers(spec, 5) == expected


@pytest.mark.parametrize("spec", ["first:x", "last:", "bogus", "1;2", "5", "-1", "0,7", "first:-1", "last:-2", "first:6", "last:9"])
def test_select_layers_refuses_bad_specs(spec):
    with pytest.raises(UserError) as e:
        select_layers(spec, 5)
    assert spec in str(e.value)


def test_set_attention_mode(toy_kernel):
    name = toy_kernel("_test_toy")
    cfg = LMConfig(vocab_size=16, n_layer=2, d_model=16, n_head=2, attention=AttentionSpec(name=name, layers="0"))
    model = LM(cfg).eval()
    x = torch.randint(0, 16, (1, 6), generator=torch.Generator().manual_seed(0))
    auto = model(x)
    set_attention_mode(model, "dense")
    assert all(b.attn.kernel.mode == "dense" for b in model.blocks)
    dense = model(x)
    assert not torch.allclose(auto, dense)  # the toy kernel doubles its output; dense mode must not

    exact_model = LM(LMConfig(vocab_size=16, n_layer=2, d_model=16, n_head=2))
    exact_model.load_state_dict(model.state_dict())
    torch.testing.assert_close(dense, exact_model.eval()(x))

    # Deterministic kernels have nothing to sample: "sample" leaves them in their own mode.
    set_attention_mode(model, "sample")
    assert all(b.attn.kernel.mode == "auto" for b in model.blocks)
    torch.testing.assert_close(model(x), auto)
    with pytest.raises(UserError, match="warp"):
        set_attention_mode(model, "warp")
