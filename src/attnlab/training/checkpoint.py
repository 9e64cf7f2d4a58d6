"""Checkpoints: weights in safetensors, config in JSON, optimizer and RNG state loaded with weights_only.

Layout:  OUT/checkpoints/step_000100/{model.safetensors, config.json, train_state.pt}
         OUT/checkpoints/latest      (name of the newest complete checkpoint)
A checkpoint is written into a temporary folder and renamed into place, and `latest` is replaced
atomically, so an interrupted write never leaves a half checkpoint where a complete one is expected; the
dot-named leftovers of an interrupted write or prune are removed when the run resumes (`remove_partial`).

Integrity: model.safetensors carries a SHA-256 of its tensors in its metadata, and config.json the SHA-256
of train_state.pt; both are checked at load, so flipped or overwritten bytes give a one-line error instead
of NaN weights. Files written before checksums existed load unchecked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import UserError

HASH_KEY = "attnlab.sha256"  # safetensors metadata: SHA-256 of the tensors (see tensors_sha256)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes in name order: independent of the file's layout."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    meta[HASH_KEY] = tensors_sha256(tensors)
    save_file(tensors, str(path), metadata=meta)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors file, refusing a damaged one with one line."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for unreadable headers and offsets
        raise UserError(f"{path} is damaged: cannot read it ({_first_line(e)})") from None
    want = meta.get(HASH_KEY)
    if want is not None and tensors_sha256(tensors) != want:
        raise UserError(f"{path} is damaged: its tensors do not match the checksum written with them")
    return tensors, meta


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _discard(folder: Path) -> None:
    """Remove a folder so that an interruption leaves only a dot-named remnant, never a half step_* folder."""
    doomed = folder.parent / f".del_{folder.name}_{os.getpid()}"
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(root: Path, step: int, weights, config: dict, train_state: dict | None = None,
                    keep: int = 0) -> Path:
    """Write checkpoint `step` under root/checkpoints and point `latest` at it. keep>0 prunes older ones.

    weights: a module, or a {name: tensor} dict (a full state gathered from shards).
    """
    if isinstance(weights, torch.nn.Module):
        weights = _state_for_safetensors(weights)
    ckdir = Path(root) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=ckdir, prefix=f".tmp_step_{step:06d}_"))
    try:
        save_safetensors(weights, tmp / "model.safetensors")
        record = dict(config)
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
            record["checksums"] = {"train_state.pt": _file_sha256(tmp / "train_state.pt")}
        (tmp / "config.json").write_text(json.dumps(record, indent=2))
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
        _fsync(ckdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(ckdir / "latest", final.name)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            _discard(old)
    return final


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


def remove_partial(root: Path) -> list[Path]:
    """Delete what interrupted writes and prunes left in root/checkpoints (dot-named entries); return them."""
    ckdir = Path(root) / "checkpoints"
    gone = [p for p in ckdir.glob(".*")] if ckdir.is_dir() else []
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return gone


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
    """Load weights, refusing a damaged file, or one whose tensor names or shapes differ from the model's."""
    state, _ = read_safetensors(Path(ckpt) / "model.safetensors")
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
    """The optimizer/RNG/progress state of a checkpoint, checked against its recorded SHA-256."""
    path = Path(ckpt) / "train_state.pt"
    if not path.is_file():
        raise UserError(f"{ckpt} holds weights only; it cannot resume training")
    want = read_config(ckpt).get("checksums", {}).get("train_state.pt")
    if want is not None and _file_sha256(path) != want:
        raise UserError(f"{path} is damaged: its SHA-256 differs from the one recorded when it was written; "
                        f"remove {ckpt} to resume from the checkpoint before it")
    try:
        # weights_only: unpickling an arbitrary file could run code; this admits tensors and plain containers.
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise UserError(f"{path} is damaged or not a training state: cannot read it ({_first_line(e)})") from None
