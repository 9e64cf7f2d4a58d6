"""`attnlab average-checkpoints`: average the weights of checkpoints into one (the paper's checkpoint averaging)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError


@dataclass
class Config:
    """Average checkpoints into one: list them (--inputs), or name a run folder and how many of its last."""

    out: str = ""
    """a .safetensors file, or a folder (it gets model.safetensors and config.json)"""
    inputs: list[str] = field(default_factory=list)
    """checkpoint folders or .safetensors files"""
    run: str = ""
    """a run folder: average its last `last` checkpoints"""
    last: int = 5
    """how many of the run's last checkpoints"""

    def __post_init__(self):
        if self.last < 1:
            raise UserError(f"last must be at least 1, got {self.last}")


def main(cfg: Config) -> Path:
    from ..training.average import average_checkpoints
    from ..training.checkpoint import list_checkpoints

    if not cfg.out:
        raise UserError("--out is required")
    if bool(cfg.inputs) == bool(cfg.run):
        raise UserError("give either --inputs (checkpoints) or --run (a run folder), not both or neither")
    paths = list(cfg.inputs)
    if cfg.run:
        found = list_checkpoints(Path(cfg.run).expanduser())
        if not found:
            raise UserError(f"no checkpoints in {cfg.run}/checkpoints")
        paths = found[-cfg.last:]
    out = average_checkpoints(paths, cfg.out)
    print(f"averaged {len(paths)} checkpoints into {out}")
    return out
