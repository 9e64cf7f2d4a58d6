"""Retrofit an attnlab key/value transform (KV shifting) into chosen layers of a transformers model.

    from attnlab.integrations.hf_transform import add_transform
    add_transform(model, "kv_shift", {"window": 1}, layers="last:8")           # identity at first

attnlab applies transforms to the raw key/value projections, before rotary. A transformers attention module
computes its projections and rotary inside its own forward, so the transform runs as a forward hook on the
module's `k_proj` / `v_proj` outputs ([B, N, Hkv·D], reshaped per head): exactly "before rotary". Its
parameters live on the attention module as the submodule `attnlab_transform` (so .to(), optimisers and
state dicts see them); `transform_state` / `load_transform_state` move them in and out of a file of their own,
which keeps a saved checkpoint loadable by plain transformers.

`identity=True` (the default) starts every shift at "own projection only" (α = β = [1, 0, …]): the model
computes exactly what it computed before, and fine-tuning moves it from there.

Limits: a shift needs the previous token's projection, which a KV-cache decoding step does not see, so a
layer with a transform refuses cached decoding (generate with use_cache=False); and, as everywhere in
attnlab, a shift does not reach across padding only when told where documents start, which the hook is not:
fine-tune and score on unpadded windows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..attention.registry import build_transform, select_layers, transforms
from ..errors import UserError
from .hf import attention_modules

TRANSFORM_ATTR = "attnlab_transform"
SAVED_INFO = "attnlab.json"  # what a saved fine-tune ran with (hf_finetune.save_finetuned)
TRANSFORM_FILE = "attnlab_transform.safetensors"


def add_transform(model: nn.Module, name: str, options: dict[str, Any] | None = None,
                  layers: str | Sequence[int] = "all", *, identity: bool = True) -> list[int]:
    """Add transform `name` to the attention of the chosen layers; returns their indices. Replaces an earlier
    transform. The other layers are untouched."""
    if name not in transforms():
        raise UserError(f"unknown transform {name!r}; choose one of {', '.join(sorted(transforms()))}")
    modules = attention_modules(model)
    if not modules:
        raise UserError(f"found no attention modules with a layer index in {type(model).__name__}")
    spec = layers if isinstance(layers, str) else (",".join(str(int(i)) for i in layers) or "none")
    chosen = select_layers(spec, max(modules) + 1)
    built = {}
    for idx in chosen:
        for mod in modules.get(idx, []):
            k_proj, v_proj = getattr(mod, "k_proj", None), getattr(mod, "v_proj", None)
            if not isinstance(k_proj, nn.Module) or not isinstance(v_proj, nn.Module):
                raise UserError(f"layer {idx} ({type(mod).__name__}) has no separate k_proj/v_proj projections, "
                                f"which the {name!r} retrofit hooks into")
            n_kv, head_dim = _kv_shape(mod, model.config)
            t = build_transform(name, options, n_kv_head=n_kv, head_dim=head_dim)
            if identity:
                _to_identity(t)
            ref = next(mod.parameters())
            built[mod] = t.to(device=ref.device)
    remove_transform(model)
    for mod, t in built.items():
        setattr(mod, TRANSFORM_ATTR, t)
        mod._attnlab_hooks = [
            mod.k_proj.register_forward_hook(_projection_hook(mod, "k")),
            mod.v_proj.register_forward_hook(_projection_hook(mod, "v")),
            mod.register_forward_pre_hook(_refuse_decoding, with_kwargs=True),
        ]
    model._attnlab_transform = {"name": name, "options": dict(options or {}), "layers": chosen}
    return chosen


def remove_transform(model: nn.Module) -> None:
    """Take the transforms out again (no-op without one)."""
    for mod in model.modules():
        if TRANSFORM_ATTR in mod._modules:
            for h in mod._attnlab_hooks:
                h.remove()
            delattr(mod, TRANSFORM_ATTR)
            del mod._attnlab_hooks
    if hasattr(model, "_attnlab_transform"):
        del model._attnlab_transform


def transform_info(model: nn.Module) -> dict | None:
    return getattr(model, "_attnlab_transform", None)


def transform_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The transforms' parameters by "layer.<idx>.<name>" (what `load_transform_state` takes back)."""
    out = {}
    for idx, mods in attention_modules(model).items():
        t = mods[0]._modules.get(TRANSFORM_ATTR)
        if t is not None:
            for key, value in t.state_dict().items():
                out[f"layer.{idx}.{key}"] = value.detach().cpu().contiguous()
    return out


def load_transform_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for idx, mods in attention_modules(model).items():
        t = mods[0]._modules.get(TRANSFORM_ATTR)
        if t is None:
            continue
        prefix = f"layer.{idx}."
        t.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def apply_saved(model: nn.Module, path: Path) -> dict:
    """Restore the transform a saved fine-tune carries (attnlab.json + its weights) into `model`, loaded from
    `path`; returns attnlab.json's content ({} for a checkpoint that has none)."""
    info_file = Path(path) / SAVED_INFO
    if not info_file.is_file():
        return {}
    try:
        info = json.loads(info_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{info_file} is not valid JSON: {e}") from None
    if info.get("transform"):
        from safetensors.torch import load_file

        weights = Path(path) / TRANSFORM_FILE
        if not weights.is_file():
            raise UserError(f"{info_file} names transform {info['transform']!r} but {weights} is missing")
        add_transform(model, info["transform"], info.get("transform_options", {}), info.get("transform_layers", []))
        load_transform_state(model, load_file(str(weights)))
    return info


def _kv_shape(mod, config) -> tuple[int, int]:
    head_dim = getattr(mod, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return int(n_kv), int(head_dim)


def _to_identity(t: nn.Module) -> None:
    """Own-projection weight 1, predecessors 0, in whatever parameterisation the transform uses."""
    for name in ("alpha", "beta"):
        p = getattr(t, name, None)
        if p is None:
            continue
        coef = torch.zeros_like(p)
        coef[:, 0] = 1.0
        with torch.no_grad():
            p.copy_(t._to_raw(coef) if hasattr(t, "_to_raw") else coef)


def _projection_hook(mod, which: str):
    def hook(_proj, _inputs, out):
        t = mod._modules[TRANSFORM_ATTR]
        b, n, width = out.shape
        x = out.view(b, n, t.n_kv_head, width // t.n_kv_head).transpose(1, 2)
        k, v, _ = t(x, x)  # the transform's own per-tensor rule; the unused half is cheap next to attention
        y = k if which == "k" else v
        return y.transpose(1, 2).reshape(b, n, width)

    return hook


def _refuse_decoding(mod, args, kwargs):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layer = getattr(mod, "layer_idx", 0)
    if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length(layer) > 0:
        raise UserError(f"layer {layer} carries a retrofitted key/value transform, which cannot decode with a KV "
                        "cache; generate with use_cache=False")
