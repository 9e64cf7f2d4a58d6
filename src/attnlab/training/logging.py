"""Metrics to JSONL and TensorBoard, from rank 0 only.

A resumed run first cuts both logs back to what its checkpoint had seen, so that the rows an interrupted
attempt logged after its last checkpoint are not followed by the same steps again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

METRICS = "metrics.jsonl"


class MetricsLogger:
    """Appends {"step", "time", **metrics} rows to OUT/metrics.jsonl and scalars to OUT/tb.

    resume_step: the step a resumed run restarts from; keep_bytes: the size metrics.jsonl had when that
    checkpoint was written (None for checkpoints that predate it: rows are then cut by their step).
    """

    def __init__(self, out_dir: Path | None, tensorboard: bool = True, resume_step: int | None = None,
                 keep_bytes: int | None = None):
        self.out_dir = Path(out_dir) if out_dir else None
        self._tb = None
        self._f = None
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / METRICS
        kept: list[dict] = []
        if resume_step is not None and path.is_file():
            kept = truncate_metrics(path, resume_step, keep_bytes)
        self._f = open(path, "ab")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides every event at or after the resumed step that earlier attempts wrote; the
            # evaluation logged at exactly that step (just before the checkpoint) is then written again.
            self._tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=resume_step)
            for row in kept:
                if row.get("step", -1) >= resume_step:
                    self._tb_scalars(row["step"], row)

    def log(self, step: int, metrics: dict) -> None:
        if self._f is not None:
            self._f.write((json.dumps({"step": step, "time": time.time(), **metrics}) + "\n").encode())
            self._f.flush()
        if self._tb is not None:
            self._tb_scalars(step, metrics)

    def _tb_scalars(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)

    def tell(self) -> int | None:
        """Bytes written to metrics.jsonl so far (a checkpoint records it); None without a file."""
        return self._f.tell() if self._f is not None else None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def truncate_metrics(path: Path, resume_step: int, keep_bytes: int | None) -> list[dict]:
    """Cut metrics.jsonl back to the rows logged before the checkpoint at `resume_step`; return the kept rows.

    With keep_bytes the cut is exact. Without it, rows logged after the checkpoint are recognised by their
    step: training rows carry the step index (< resume_step before it), evaluations the number of steps done
    (<= resume_step).
    """
    with open(path, "rb") as f:
        data = f.read()
    if keep_bytes is not None and keep_bytes <= len(data):
        data = data[:keep_bytes]
    else:
        lines = [ln for ln in data.splitlines(keepends=True) if ln.strip()]
        data = b"".join(ln for ln in lines if _before(ln, resume_step))
    # Written to the side and renamed, so an interruption here leaves the old log or the new, not half.
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return [json.loads(ln) for ln in data.splitlines() if ln.strip()]


def _before(line: bytes, resume_step: int) -> bool:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:  # a row cut short by the interruption
        return False
    step = row.get("step", 0)
    evaluation = all(k.startswith("eval/") for k in row if k not in ("step", "time"))
    return step <= resume_step if evaluation else step < resume_step


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
