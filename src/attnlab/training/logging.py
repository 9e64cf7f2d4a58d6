"""Metrics to JSONL and TensorBoard, from rank 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, out_dir: Path | None, tensorboard: bool = True):
        self.out_dir = Path(out_dir) if out_dir else None
        self._tb = None
        self._f = None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._f = open(self.out_dir / "metrics.jsonl", "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tb"))

    def log(self, step: int, metrics: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
            self._f.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
