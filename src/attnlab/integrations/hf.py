"""Run attnlab attention kernels inside Hugging Face transformers models, in chosen layers only.

    from attnlab.integrations.hf import patch_model, unpatch_model
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    patch_model(model, "hyper", {"min_seq_len": 4096, "prescore": "kmeans"}, layers="last:8")

How it plugs in. A transformers (>= 4.53, 5.x) attention module calls
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, attention_mask, scaling=, dropout=, ...)`
and the model builds `attention_mask` with `ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]`. An
implementation name with no registered mask builder gets `attention_mask=None` silently (padding ignored), so
both are registered. The name is a property of the config, which every layer shares, so the registered
function dispatches per module: a module that carries an `attnlab_kernel` runs it; every other module calls
the model's own function (SDPA or eager) with the very mask that function would have received, so unpatched
layers stay bit-identical. Two names are registered, one per base the unpatched layers keep:
"attnlab" (SDPA base, boolean masks) and "attnlab_eager" (eager base, additive float masks).

What a patched layer does:
- prefill / full forward: the kernel gets q [B,Hq,N,D] and k, v [B,Hkv,N,D] (grouped-query attention is the
  kernel's job), the module's own `scaling`, and the mask reduced to its cheapest form: (causal plus) a
  [B,1,1,N] key-padding mask when the model's mask is exactly that, in causal and in bidirectional layers,
  otherwise the full boolean mask.
- decoding with a KV cache (fewer queries than keys in a causal layer, or a paged cache): attnlab's
  approximate kernels are prefill algorithms (HyperAttention's official code is prefill-only too), so by
  default such calls fall back to the model's own exact attention; `decode="refuse"` raises instead.
- training with attention dropout > 0: `exact` applies it exactly as the model does (through the model's own
  function); other kernels cannot drop individual attention weights, so they refuse with a message rather
  than silently skip the dropout (set the model's attention dropout to 0, or train with `exact`).
- a model feature the kernels cannot reproduce (logit soft-capping, attention sinks, position biases, an
  additive float bias in the mask) is refused in patched layers, never ignored: `patch_model` names the
  layers and the reason up front (`unpatchable_layers`), including attention modules that compute attention
  themselves instead of calling the AttentionInterface (patching them would change nothing).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import nn

from ..attention.masks import causal_mask
from ..attention.registry import build_kernel, kernel_entry, select_layers
from ..errors import UserError

IMPL_FOR_BASE = {"sdpa": "attnlab", "eager": "attnlab_eager"}
KERNEL_ATTR = "attnlab_kernel"
_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")


@dataclass
class HFPatchConfig:
    """Which attnlab mechanism replaces the attention of which layers of a transformers model.

    attention/options: a registered kernel and its options (`attnlab list`), e.g. "hyper" with
    {"prescore": "kmeans"}. layers: "all", "first:N", "last:N", "odd", "even", "none" or "0,3,5".
    decode: what a patched layer does on a KV-cache decoding step: "exact" (the model's own attention)
    or "refuse".
    """

    attention: str = "exact"
    options: dict[str, Any] = field(default_factory=dict)
    layers: str = "all"
    decode: Literal["exact", "refuse"] = "exact"


@dataclass
class _PatchInfo:
    base: str  # the model's own implementation, restored by unpatch_model
    config: HFPatchConfig
    layers: list[int]


def require_transformers():
    """Import transformers, or explain how to get a version with the interfaces this module needs."""
    try:
        import transformers
        from transformers import masking_utils
    except ImportError:
        raise UserError("the Hugging Face integration needs transformers: pip install 'attnlab[hf]'") from None
    if not hasattr(masking_utils, "AttentionMaskInterface"):
        raise UserError(
            f"transformers {transformers.__version__} has no AttentionMaskInterface; "
            "attnlab's Hugging Face integration needs transformers >= 4.53"
        )
    return transformers


_registered = False


def register() -> None:
    """Register the dispatching attention functions and their mask builders with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    transformers = require_transformers()
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    for base, impl in IMPL_FOR_BASE.items():
        transformers.AttentionInterface.register(impl, _make_dispatch(base))
        AttentionMaskInterface.register(impl, {"sdpa": sdpa_mask, "eager": eager_mask}[base])
    _registered = True


def attention_modules(model: nn.Module) -> dict[int, list[nn.Module]]:
    """The model's attention modules by layer index (a layer may hold self- and cross-attention)."""
    found: dict[int, list[nn.Module]] = {}
    for mod in model.modules():
        idx = getattr(mod, "layer_idx", None)
        if isinstance(idx, int) and hasattr(mod, "is_causal") and "attention" in type(mod).__name__.lower():
            found.setdefault(idx, []).append(mod)
    return found


def patch_model(
    model: nn.Module,
    attention: str = "exact",
    options: dict[str, Any] | None = None,
    layers: str | Sequence[int] = "all",
    *,
    decode: str = "exact",
) -> list[int]:
    """Run attnlab `attention` in the chosen layers of a transformers model; returns the patched layer indices.

    The other layers keep the model's own attention. Patching a patched model replaces the earlier patch.
    Undo with `unpatch_model`; `original_attention` switches the patch off temporarily.
    """
    cfg = HFPatchConfig(attention, dict(options or {}), _layer_spec(layers), decode)  # type: ignore[arg-type]
    if cfg.decode not in ("exact", "refuse"):
        raise UserError(f"decode must be 'exact' or 'refuse', got {cfg.decode!r}")
    register()
    kernel_entry(cfg.attention)
    earlier = patch_info(model)
    base = earlier.base if earlier else getattr(model.config, "_attn_implementation", None) or "sdpa"
    if base not in IMPL_FOR_BASE:
        raise UserError(
            f"the model runs attention {base!r}; attnlab patches models that use 'sdpa' or 'eager': "
            "load it with attn_implementation='sdpa'"
        )
    modules = attention_modules(model)
    if not modules:
        raise UserError(
            f"found no attention modules with a layer index in {type(model).__name__}; "
            "the integration needs a model built on transformers' AttentionInterface"
        )
    chosen = select_layers(cfg.layers, max(modules) + 1)
    _refuse_unpatchable(model, modules, chosen, cfg.attention)
    kernels = {}
    for idx in chosen:
        for mod in modules.get(idx, []):
            causal = bool(getattr(mod, "is_causal", True))
            kernel = build_kernel(cfg.attention, cfg.options, need={"causal": causal, "noncausal": not causal})
            # The kernel joins a model that may already be in eval mode; it must follow, not stay in training.
            kernels[mod] = kernel.to(_device_of(mod)).train(mod.training)
    unpatch_model(model)  # only now: a request that fails above leaves the model (and any patch) as it was
    for mod, kernel in kernels.items():
        # A submodule, so that .to(), .train()/.eval() and set_attention_mode reach it.
        setattr(mod, KERNEL_ATTR, kernel)
        mod.attnlab_name = cfg.attention
        mod.attnlab_decode = cfg.decode
    model._attnlab_patch = _PatchInfo(base, cfg, chosen)
    _set_implementation(model, IMPL_FOR_BASE[base])
    return chosen


def unpatchable_layers(model: nn.Module, modules: dict[int, list[nn.Module]] | None = None,
                       layers: Sequence[int] | None = None) -> dict[str, list[int]]:
    """{reason: layer indices} for the attention layers whose computation an attnlab kernel cannot take over:
    modules that bypass transformers' AttentionInterface (patching them would silently change nothing), and
    features the kernels do not reproduce (logit soft-capping, learned attention sinks)."""
    modules = attention_modules(model) if modules is None else modules
    found: dict[str, list[int]] = {}
    for idx in sorted(modules if layers is None else layers):
        for mod in modules.get(idx, []):
            why = _unpatchable(mod, getattr(mod, "config", None) or model.config)
            if why and idx not in found.setdefault(why, []):
                found[why].append(idx)
    return found


def _unpatchable(mod: nn.Module, config) -> str | None:
    try:
        source = inspect.getsource(type(mod).forward)
    except (OSError, TypeError):
        source = None
    if source is not None and "ATTENTION_FUNCTIONS" not in source:
        return f"{type(mod).__name__} computes attention itself instead of calling transformers' AttentionInterface"
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap:
        return f"attention logit soft-capping (attn_logit_softcapping={softcap})"
    if isinstance(getattr(mod, "sinks", None), torch.Tensor):
        return "learned attention sinks"
    return None


def _refuse_unpatchable(model, modules, chosen, name):
    found = unpatchable_layers(model, modules, chosen)
    if found:
        parts = "; ".join(f"layers {_ranges(idx)}: {why}" for why, idx in found.items())
        raise UserError(f"cannot patch attention {name!r} into {type(model).__name__}: {parts}")


def _ranges(idx: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(idx):
        start = x if start is None else start
        if i + 1 == len(idx) or idx[i + 1] != x + 1:
            out.append(str(x) if x == start else f"{start}-{x}")
            start = None
    return ",".join(out)


def unpatch_model(model: nn.Module) -> None:
    """Remove a patch: every layer runs the model's own attention again (no-op on an unpatched model)."""
    info = getattr(model, "_attnlab_patch", None)
    if info is None:
        return
    for mod in model.modules():
        if KERNEL_ATTR in mod._modules:
            delattr(mod, KERNEL_ATTR)
            del mod.attnlab_name, mod.attnlab_decode
    _set_implementation(model, info.base)
    del model._attnlab_patch


def patch_info(model: nn.Module) -> _PatchInfo | None:
    return getattr(model, "_attnlab_patch", None)


@contextlib.contextmanager
def original_attention(model: nn.Module) -> Iterator[None]:
    """Run a patched model with its own attention in every layer for the duration of the block.

    Lets an evaluation time the patched and the unpatched model side by side on one copy of the weights.
    """
    info = patch_info(model)
    if info is None:
        yield
        return
    _set_implementation(model, info.base)
    try:
        yield
    finally:
        _set_implementation(model, IMPL_FOR_BASE[info.base])


def _layer_spec(layers: str | Sequence[int]) -> str:
    if isinstance(layers, str):
        return layers
    items = [int(i) for i in layers]
    return ",".join(map(str, items)) if items else "none"


def _device_of(mod: nn.Module) -> torch.device:
    for p in mod.parameters():
        return p.device
    return torch.device("cpu")


def _set_implementation(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # transformers 4.x before set_attn_implementation
        model.config._attn_implementation = name


def _base_function(base: str, module: nn.Module):
    """The function the model itself would call for this module under implementation `base`."""
    if base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    # Eager attention is not registered globally: each model file defines its own.
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise UserError(
            f"{type(module).__name__} has no eager_attention_forward; load the model with attn_implementation='sdpa'"
        )
    return fn


def _make_dispatch(base: str):
    def attnlab_attention(module, query, key, value, attention_mask, *args, **kwargs):
        kernel = module._modules.get(KERNEL_ATTR)
        if kernel is None:
            return _base_function(base, module)(module, query, key, value, attention_mask, *args, **kwargs)
        return _patched_attention(kernel, base, module, query, key, value, attention_mask, *args, **kwargs)

    attnlab_attention.__name__ = f"attnlab_attention_{base}"
    return attnlab_attention


def _patched_attention(kernel, base, module, query, key, value, attention_mask, *args, **kwargs):
    name = module.attnlab_name
    for kw in _UNSUPPORTED_KWARGS:
        if kwargs.get(kw) is not None:
            raise UserError(
                f"layer {module.layer_idx} of this model uses {kw}, which attention {name!r} cannot reproduce; "
                "leave that layer unpatched"
            )
    nq, nk = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal")
    is_causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    cached = kwargs.get("cache") is not None or (is_causal and nk != nq)
    dropout = float(kwargs.get("dropout", 0.0) or 0.0)
    if cached or (module.training and dropout > 0):
        if cached and module.attnlab_decode == "refuse":
            raise UserError(
                f"attention {name!r} in layer {module.layer_idx} runs prefill only; this call decodes with a KV "
                f"cache ({nq} queries, {nk} keys): patch with decode='exact' to fall back to exact attention there"
            )
        if not cached and name != "exact":
            raise UserError(
                f"attention {name!r} cannot apply attention dropout ({dropout}) while training layer "
                f"{module.layer_idx}; set the model's attention dropout to 0 or train with 'exact'"
            )
        return _base_function(base, module)(module, query, key, value, attention_mask, *args, **kwargs)
    mask, causal = kernel_mask(attention_mask, is_causal, nq, nk)
    if mask is not None and not kernel_entry(name).caps.mask:
        raise UserError(f"attention {name!r} cannot honour attention masks (padding); pass unpadded batches")
    out = kernel(query, key, value, causal=causal, mask=mask, scale=kwargs.get("scaling"), return_lse=False)
    return out.transpose(1, 2).contiguous(), None


def kernel_mask(attention_mask: torch.Tensor | None, is_causal: bool, nq: int, nk: int):
    """Turn the mask a transformers model built into the kernel signature's (mask, causal) pair.

    A causal layer whose mask is exactly "causal and these keys are real tokens" (the usual padded batch)
    gets causal=True plus a [B, 1, 1, Nk] key mask, and so does a non-causal layer (an encoder) whose mask
    repeats one key row for every query: approximate kernels honour a key mask cheaply and keep padding out
    of their structure (HyperAttention runs each sequence on its real keys). Any other pattern (sliding
    windows, packed documents) is passed whole, with causality already folded in.
    """
    causal = is_causal and nq > 1  # one query sees every cached key: no causal cut, as in HF's SDPA path
    if attention_mask is None:
        return None, causal
    m = attention_mask
    if m.dtype != torch.bool:
        lowest = torch.finfo(m.dtype).min / 2
        keep, blocked = m == 0, m <= lowest
        if not bool((keep | blocked).all()):
            raise UserError("the model passes an additive attention bias, which attnlab kernels cannot apply")
        m = keep
    if m.dim() == 2:  # [B, Nk] key padding
        m = m[:, None, None, :]
    if m.dim() != 4:
        raise UserError(f"unsupported attention mask of shape {tuple(attention_mask.shape)}")
    if m.shape[-2] == 1:  # a key mask only: causality is still to apply
        return (None if bool(m.all()) else m), causal
    if causal and nq == nk:
        # Under causality the last query sees every real key, so its row is the key-padding mask.
        keys = m[:, :, -1:, :]
        if torch.equal(m, causal_mask(nq, nk, m.device) & keys):
            return (None if bool(keys.all()) else keys), True
    elif not causal:
        # An encoder's (or cross-attention's) padding mask repeats one key row for every query.
        keys = m[:, :, :1, :]
        if m.stride(2) == 0 or torch.equal(m, keys.expand_as(m)):
            return (None if bool(keys.all()) else keys), False
    return m, False  # causality, if any, is already part of the model's full mask
