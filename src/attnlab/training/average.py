"""Checkpoint averaging: the element-wise mean of the weights of several checkpoints of one run.

"Attention Is All You Need" decodes from "a single model obtained by averaging the last 5 checkpoints, which
were written at 10-minute intervals" (20 for the big model). Averaging nearby points of one trajectory
lands closer to the middle of the basin they circle, which usually scores a little better than any one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from ..errors import UserError
from .checkpoint import HASH_KEY, read_safetensors, save_safetensors

WEIGHTS = "model.safetensors"


def _weights_file(path) -> Path:
    """A .safetensors file, or a checkpoint folder holding model.safetensors."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / WEIGHTS
    if not p.is_file():
        raise UserError(f"checkpoint weights not found: {p}")
    return p


def average_checkpoints(paths, out) -> Path:
    """Average the tensors of `paths` (files or checkpoint folders) into `out`.

    `out` is a .safetensors file, or a folder that receives model.safetensors (plus the config.json of the
    last input, when it has one, so the result loads like any checkpoint). Floating tensors are averaged in
    float64 and stored in their own dtype; integer tensors (counters, ids) must agree and are copied.
    """
    files = [_weights_file(p) for p in paths]
    if not files:
        raise UserError("average-checkpoints needs at least one checkpoint")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    metadata = None
    for n, f in enumerate(files):
        tensors, meta = read_safetensors(f)  # one file at a time, its checksum verified
        keys = set(tensors)
        if n == 0:
            metadata = meta
            expected = keys
        elif keys != expected:
            diff = sorted(keys ^ expected)[:3]
            raise UserError(f"{f} holds other tensors than {files[0]} (e.g. {', '.join(diff)}); "
                            f"only checkpoints of one model can be averaged")
        for k, t in tensors.items():
            if n == 0:
                dtypes[k] = t.dtype
                total[k] = t.to(torch.float64) if t.is_floating_point() else t.clone()
                continue
            if t.shape != total[k].shape:
                raise UserError(f"tensor {k} has shape {list(t.shape)} in {f} but {list(total[k].shape)} "
                                f"in {files[0]}")
            if t.is_floating_point():
                total[k] += t.to(torch.float64)
            elif not torch.equal(t, total[k]):
                raise UserError(f"integer tensor {k} differs between {files[0]} and {f}; cannot average it")
        del tensors
    avg = {k: (t / len(files)).to(dtypes[k]) if dtypes[k].is_floating_point else t for k, t in total.items()}
    o = Path(out).expanduser()
    if o.suffix != ".safetensors":
        o.mkdir(parents=True, exist_ok=True)
        config = files[-1].parent / "config.json"
        if config.is_file():
            shutil.copyfile(config, o / "config.json")
        o = o / WEIGHTS
    else:
        o.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in (metadata or {}).items() if k != HASH_KEY}  # the average gets its own checksum
    meta["averaged_from"] = ",".join(str(f) for f in files)
    save_safetensors(avg, o, metadata=meta)
    return o
