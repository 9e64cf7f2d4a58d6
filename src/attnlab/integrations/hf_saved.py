"""Saving a fine-tuned model so that plain transformers loads it, and loading it back with what it ran with.

`save_finetuned` unpatches the kernels and takes the retrofitted transforms out before `save_pretrained`
(safetensors), so the checkpoint's config names the model's own attention; the patch goes to `attnlab.json`
and the transforms' weights to `attnlab_transform.safetensors` beside it. `load_finetuned` restores both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .hf import patch_info, patch_model, unpatch_model
from .hf_load import load_pretrained
from .hf_transform import (SAVED_INFO, TRANSFORM_FILE, add_transform, apply_saved, load_transform_state,
                           remove_transform, transform_info, transform_state)


def save_finetuned(model: nn.Module, tokenizer, out: Path, record: dict) -> None:
    """save_pretrained (safetensors) with the model's own attention in the config, so that plain transformers
    loads it; the attnlab patch and any transform weights go beside it (attnlab.json, a safetensors file)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    pinfo, tinfo, tstate = patch_info(model), transform_info(model), transform_state(model)
    remove_transform(model)
    unpatch_model(model)
    try:
        model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    finally:  # the caller keeps the model as it was
        if tinfo:
            add_transform(model, tinfo["name"], tinfo["options"], tinfo["layers"])
            load_transform_state(model, tstate)
        if pinfo:
            patch_model(model, pinfo.config.attention, pinfo.config.options, pinfo.layers, decode=pinfo.config.decode)
    if tstate:
        save_file(tstate, str(out / TRANSFORM_FILE))
    saved = {
        "attention": pinfo.config.attention if pinfo else "none",
        "options": dict(pinfo.config.options) if pinfo else {},
        "layers": pinfo.layers if pinfo else [],
        "transform": tinfo["name"] if tinfo else None,
        "transform_options": tinfo["options"] if tinfo else {},
        "transform_layers": tinfo["layers"] if tinfo else [],
    }
    (out / SAVED_INFO).write_text(json.dumps(saved, indent=2) + "\n")
    (out / "finetune.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def load_finetuned(path: str | Path, *, dtype: str = "float32", device: torch.device | str = "cpu",
                   attention: bool = True):
    """(tokenizer, model, attnlab.json) of a saved fine-tune, with its transform and (when `attention`) its
    patched kernel restored."""
    tok, model = load_pretrained(path, dtype=dtype, device=device)
    info = apply_saved(model, Path(path))
    if attention and info.get("attention", "none") != "none":
        patch_model(model, info["attention"], info.get("options", {}), info.get("layers", "all"))
    return tok, model, info
