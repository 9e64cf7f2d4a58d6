"""Checkpoints: weights in safetensors, config in JSON, optimizer and RNG state loaded with weights_only.

Layout:  OUT/checkpoints/step_000100/{model.safetensors, config.json, train_state.pt}
         OUT/checkpoints/latest      (name of the newest complete checkpoint)
A checkpoint is written into a temporary folder and renamed into place, and `latest` is replaced
atomically, so an interrupted write never leaves a half checkpoint where a complete one is expected.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError


def _state_for_safetensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights share storage; safetensors refuses shared tensors, so keep the first name of each.
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: Path, step: int, model, config: dict, train_state: dict | None = None, keep: int = 0) -> Path:
    """Write checkpoint `step` under root/checkpoints and point `latest` at it. keep>0 prunes older ones."""
    ckdir = Path(root) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=ckdir, prefix=f".tmp_step_{step:06d}_"))
    try:
        save_file(_state_for_safetensors(model), str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(ckdir / "latest", final.name)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    ckdir = Path(root) / "checkpoints"
    return sorted(p for p in ckdir.glob("step_*") if p.is_dir()) if ckdir.is_dir() else []


def resolve_checkpoint(path) -> Path:
    """Accept a checkpoint folder, or a run folder (its latest checkpoint)."""
    p = Path(path).expanduser()
    if (p / "model.safetensors").is_file():
        return p
    latest = p / "checkpoints" / "latest"
    if latest.is_file():
        ck = p / "checkpoints" / latest.read_text().strip()
        if (ck / "model.safetensors").is_file():
            return ck
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    raise UserError(f"no checkpoint in {p} (expected model.safetensors or checkpoints/latest)")


def read_config(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {Path(ckpt) / 'config.json'}: {e}") from None


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load weights, refusing a checkpoint whose tensor names or shapes differ from the model's."""
    try:
        state = load_file(str(Path(ckpt) / "model.safetensors"))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise UserError(f"cannot read weights from {ckpt}: {e}") from None
    own = model.state_dict()
    missing = [k for k in own if k not in state and not _is_tied_alias(model, k, state)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"checkpoint {ckpt} does not match the model: {what} tensors")
    for k, t in state.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise UserError(
                f"checkpoint {ckpt} does not match the model: {k} has shape {list(t.shape)} in the checkpoint, "
                f"{list(own[k].shape)} in the model"
            )
    model.load_state_dict(state, strict=False)


def _is_tied_alias(model, name, state) -> bool:
    own = model.state_dict()
    t = own[name]
    return any(
        other in state and own[other].untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
        for other in own
        if other != name
    )


def load_train_state(ckpt: Path) -> dict:
    path = Path(ckpt) / "train_state.pt"
    if not path.is_file():
        raise UserError(f"{ckpt} holds weights only; it cannot resume training")
    return torch.load(path, weights_only=True, map_location="cpu")
