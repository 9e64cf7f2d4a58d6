"""Loading a finished run of any kind: its model, tokenizer and data config, from a run folder or one
checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..training.checkpoint import read_config, resolve_checkpoint


@dataclass
class LoadedRun:
    model: object
    tokenizer: object  # None where the kind has none (synthetic tasks, images, series)
    data: object  # the kind's data config
    record: dict  # the checkpoint's config.json
    ckpt: Path  # the checkpoint folder
    run_dir: Path  # the run folder it belongs to
    kind: str = "lm"


def load_run(path) -> LoadedRun:
    """Rebuild the model of a run folder (its latest checkpoint) or of a checkpoint folder, with its weights,
    tokenizer and data config."""
    from .kinds import kind

    ckpt = resolve_checkpoint(path)
    record = read_config(ckpt)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    return kind(record.get("run", {}).get("task", "lm")).load(record, ckpt, run_dir)
