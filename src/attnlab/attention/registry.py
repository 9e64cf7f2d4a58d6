"""Attention mechanisms and key/value transforms, registered by name with a config and capabilities.

A *kernel* computes attention from projected q, k, v; every kernel has the same call signature:

    kernel(q, k, v, *, causal: bool, mask: BoolTensor | None, scale: float | None,
           return_lse: bool = False) -> out  |  (out, lse)
    q: [B, Hq, Nq, D]   k, v: [B, Hkv, Nk, D]   out: [B, Hq, Nq, D]   lse: [B, Hq, Nq]

`mask` is boolean (True = may attend), broadcastable to [B, Hq, Nq, Nk]. `causal` aligns queries to the
newest keys (bottom-right), which is what KV-cache decoding needs.

A *transform* rewrites (k, v) between the projections and the kernel (before rotary); KV shifting is one.

Models never branch on which mechanism runs: they ask the registry to build one and check its capabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..config import from_dict
from ..errors import UserError


@dataclass(frozen=True)
class Capabilities:
    causal: bool = True
    """supports causal=True"""
    noncausal: bool = True
    """supports causal=False (encoders, cross-attention)"""
    mask: bool = True
    """honours an explicit boolean mask (padding, documents)"""
    kv_cache: bool = True
    """can decode: fewer queries than keys, keys from a cache"""
    stochastic: bool = False
    """output depends on a random draw"""
    analysis: bool = False
    """a tool to study attention at dense cost (it computes every score), not a mechanism to train with"""


class Kernel(nn.Module):
    """Base class of attention kernels.

    `mode` lets a trainer or evaluator switch every kernel of a model at once without knowing which
    mechanisms they are: "auto" is the mechanism's own behaviour, "dense" is exact attention with the same
    weights. Stochastic kernels add "sample" (subsample even in eval, for self-ensembles).
    """

    modes: tuple[str, ...] = ("auto", "dense")

    def __init__(self, config: Any = None):
        super().__init__()
        self.config = config
        self.mode = "auto"

    def set_mode(self, mode: str) -> None:
        if mode not in self.modes:
            raise UserError(f"attention mode {mode!r} is not one of {', '.join(self.modes)} for {type(self).__name__}")
        self.mode = mode

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None, return_lse=False):
        if self.mode == "dense":
            from .exact import exact_attention

            return exact_attention(q, k, v, causal=causal, mask=mask, scale=scale, return_lse=return_lse)
        return self.attend(q, k, v, causal=causal, mask=mask, scale=scale, return_lse=return_lse)

    def attend(self, q, k, v, *, causal, mask, scale, return_lse):  # pragma: no cover - abstract
        raise NotImplementedError

    # What `attnlab bench attention` asks a mechanism, so that it never branches on a mechanism's name.
    small_options: ClassVar[dict] = {}
    """options under which the mechanism approximates at a few thousand keys (the benchmark's error study)"""
    paired_designs: ClassVar[dict[str, tuple[str, str, str]]] = {}
    """bench_variants (by label suffix) that make the same random draws as the mechanism and differ from it
    only on some query rows: (those rows, the mechanism's design, the variant's design), which name the error
    study's columns `{rows}_share`, `rel_err_{rows}_{design}` and `lse_err_{rows}_{design}`"""

    @classmethod
    def bench_variants(cls, options: dict, study: str) -> dict[str, dict]:
        """Variants worth measuring beside the mechanism with `options`: {label suffix: options}.
        study: "speed" (time, memory) or "error" (the error at equal sizes)."""
        return {}


class Transform(nn.Module):
    """Base class of key/value transforms.

    forward(k, v, *, reset, state) -> (k, v, new_state)
      k, v: [B, Hkv, N, D] raw projections; reset: [B, N] bool, True where a token must not look back
      (document start, or the previous token is padding); state: what the layer's KV cache kept from the
      previous call (None on the first), and new_state is what it should keep for the next.
    A transform is built for one layer's head shape, kept as `n_kv_head` and `head_dim`.
    """

    def __init__(self, config: Any = None, *, n_kv_head: int = 1, head_dim: int = 1):
        super().__init__()
        self.config = config
        self.n_kv_head = n_kv_head
        self.head_dim = head_dim


@dataclass
class Entry:
    name: str
    config_cls: type
    cls: type
    caps: Capabilities
    description: str


_KERNELS: dict[str, Entry] = {}
_TRANSFORMS: dict[str, Entry] = {}


def _register(table, name, config_cls, caps, description):
    def deco(cls):
        if name in table:
            raise ValueError(f"{name!r} is registered twice")
        doc = description or (cls.__doc__ or "").strip().splitlines()[0]
        table[name] = Entry(name, config_cls, cls, caps, doc)
        return cls

    return deco


def register_kernel(name: str, config_cls: type, caps: Capabilities = Capabilities(), description: str = ""):
    return _register(_KERNELS, name, config_cls, caps, description)


def register_transform(name: str, config_cls: type, description: str = ""):
    return _register(_TRANSFORMS, name, config_cls, Capabilities(), description)


def _lookup(table, name, what):
    _load_builtins()
    if name not in table:
        raise UserError(f"unknown {what} {name!r}; choose one of: {', '.join(sorted(table))}")
    return table[name]


def kernels() -> dict[str, Entry]:
    _load_builtins()
    return dict(_KERNELS)


def transforms() -> dict[str, Entry]:
    _load_builtins()
    return dict(_TRANSFORMS)


def kernel_entry(name: str) -> Entry:
    return _lookup(_KERNELS, name, "attention mechanism")


def make_config(config_cls: type, options: dict | None, what: str):
    """Build a config dataclass from a dict, refusing unknown keys and wrong types with one line."""
    return from_dict(config_cls, options, what, noun="option")


def build_kernel(name: str, options: dict | None = None, *, need: dict[str, bool] | None = None) -> Kernel:
    """Build a registered kernel; `need` names capabilities the caller requires (e.g. {"causal": True})."""
    entry = kernel_entry(name)
    check_capabilities(entry, need or {})
    cfg = make_config(entry.config_cls, options, f"attention {name!r}")
    return entry.cls(cfg)


def check_capabilities(entry: Entry, need: dict[str, bool]) -> None:
    missing = [cap for cap, wanted in need.items() if wanted and not getattr(entry.caps, cap)]
    if missing:
        able = [n for n, e in kernels().items() if all(getattr(e.caps, c) for c in missing)]
        raise UserError(
            f"attention {entry.name!r} cannot be used here: it lacks {', '.join(missing)}; "
            f"mechanisms that can: {', '.join(able) or 'none'}"
        )


def build_transform(name: str, options: dict | None, *, n_kv_head: int, head_dim: int) -> Transform | None:
    if name in (None, "", "none"):
        if options:
            raise UserError("transform options were given but no transform is selected")
        return None
    entry = _lookup(_TRANSFORMS, name, "key/value transform")
    cfg = make_config(entry.config_cls, options, f"transform {name!r}")
    return entry.cls(cfg, n_kv_head=n_kv_head, head_dim=head_dim)


def set_attention_mode(model: nn.Module, mode: str) -> None:
    """Switch every kernel in `model` to `mode` ("auto", "dense", or a kernel-specific one)."""
    for m in model.modules():
        if isinstance(m, Kernel):
            # Deterministic kernels have nothing to sample: "sample" leaves them as they are.
            m.set_mode("auto" if mode == "sample" and mode not in m.modes else mode)


# The modules of this package that register built-in mechanisms: a new mechanism is its module (or package)
# plus one name here. Registration stays explicit, so importing the registry never runs unrelated modules.
_BUILTINS = ("exact", "ssa", "hyper", "kv_shift", "prune", "topkeys")
_loaded = False


def _load_builtins():
    """Import the built-in mechanisms once, on the registry's first use (they import the registry)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    for name in _BUILTINS:
        importlib.import_module(f"{__package__}.{name}")


@dataclass
class AttentionSpec:
    """Which attention a model uses: a mechanism in chosen layers (exact elsewhere), and an optional key/value
    transform in every layer."""

    name: str = "exact"
    """the attention mechanism (`attnlab list`)"""
    options: dict[str, Any] = field(default_factory=dict)
    """the mechanism's options, e.g. {"factor": 4}"""
    layers: str = "all"
    """where the mechanism runs: all, first:N, last:N, odd, even, or 0,3,5; other layers use exact"""
    transform: str = "none"
    """key/value transform applied in every layer (kv_shift or none)"""
    transform_options: dict[str, Any] = field(default_factory=dict)
    """the transform's options"""


def select_layers(spec: str, n_layer: int) -> list[int]:
    """Parse a layer selection ("all", "first:N", "last:N", "odd", "even", "0,3,5") into sorted indices."""
    s = str(spec).strip().lower()
    try:
        if s == "all":
            out = list(range(n_layer))
        elif s == "none":
            out = []
        elif s == "odd":
            out = list(range(1, n_layer, 2))
        elif s == "even":
            out = list(range(0, n_layer, 2))
        elif s.startswith(("first:", "last:")):
            head, _, count = s.partition(":")
            n = int(count)
            if n < 0:  # "first:-1" would otherwise select nothing without a word
                raise ValueError(count)
            if n > n_layer:  # clamping would hide a selection meant for a deeper model
                raise UserError(f"layer selection {spec!r} asks for {n} layers but the model has {n_layer}")
            out = list(range(n)) if head == "first" else list(range(n_layer - n, n_layer))
        else:
            out = sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise UserError(
            f"bad layer selection {spec!r}: use all, none, odd, even, first:N, last:N or a list like 0,3,5"
        ) from None
    bad = [i for i in out if not 0 <= i < n_layer]
    if bad:
        raise UserError(f"layer selection {spec!r} names layers {bad} but the model has {n_layer} (0..{n_layer - 1})")
    return out
