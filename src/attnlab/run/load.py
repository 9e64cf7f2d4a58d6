"""Loading a finished run: its model, tokenizer and data config, from a run folder or one checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..config import from_dict
from ..models.lm import LM, LMConfig
from ..training.checkpoint import load_weights, read_config, resolve_checkpoint
from .build import build_task, tokenizer_for
from .config import DataConfig


@dataclass
class LoadedRun:
    model: LM
    tokenizer: object  # None for synthetic tasks
    data: DataConfig
    record: dict  # the checkpoint's config.json
    ckpt: Path  # the checkpoint folder
    run_dir: Path  # the run folder it belongs to

    def task(self, *, batch_size: int, seed: int = 0, seq_len: int | None = None, data_path: str = ""):
        """The run's task (its validation data) at `seq_len` (default: the model's), optionally on other text."""
        data = replace(self.data, path=data_path) if data_path else self.data
        return build_task(data, self.model.cfg, batch_size, seed, self.tokenizer, seq_len=seq_len)


def run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt


def load_run(path) -> LoadedRun:
    """Rebuild the LM of a run folder (its latest checkpoint) or of a checkpoint folder, with its weights,
    tokenizer and data config."""
    ckpt = resolve_checkpoint(path)
    record = read_config(ckpt)
    run = record.get("run", {})
    model = LM(from_dict(LMConfig, run.get("model"), "checkpoint model config"))
    load_weights(model, ckpt)
    data = from_dict(DataConfig, run.get("data"), "checkpoint data config")
    run_dir = run_dir_of(ckpt)
    return LoadedRun(model, tokenizer_for(data, run_dir, fresh=False), data, record, ckpt, run_dir)
