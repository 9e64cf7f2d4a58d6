"""Kill a training run with SIGKILL at random moments, resume it each time, and compare with an uninterrupted run.

A tiny LM (dropout on, so the RNG state must survive too) trains on a synthetic task in a subprocess through
the Python API. The harness kills it K times: half of the kills at a uniformly random moment of the attempt,
half the instant a checkpoint write is seen in progress (a `.tmp_step_*` folder exists). After every kill it
checks that `latest` names a complete checkpoint whose checksums verify, then resumes (or, when the kill came
before the first checkpoint, removes the folder and starts over, as the one-owner rule asks). At the end the
metrics rows (wall-clock fields aside), the TensorBoard scalars, the final weights and the optimizer state must
equal those of the uninterrupted run bit for bit, and no partial checkpoint may remain.

    python tools/kill_resume.py --kills 20 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMING = {"time", "train/tokens_per_s"}


def worker(out: str, resume: bool, marker: str, steps: int) -> None:
    import torch

    from attnlab.models.lm import LM, LMConfig
    from attnlab.tasks import SyntheticConfig, SyntheticTask
    from attnlab.training import OptimConfig, TrainConfig, train

    import torch._dynamo  # noqa: F401  (the optimizer imports it: seconds, which would skew the random moments)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LM(LMConfig(vocab_size=64, n_layer=2, n_head=2, d_model=64, max_seq_len=64, dropout=0.1))
    task = SyntheticTask(SyntheticConfig(kind="induction", vocab_size=64, seq_len=64, eval_batches=2), batch_size=8,
                         seed=1)
    cfg = TrainConfig(steps=steps, batch_size=8, eval_every=25, save_every=2, keep_checkpoints=3, log_every=1,
                      seed=2, device="cpu", progress=False, tensorboard=True, resume=resume)
    Path(marker).write_text("training")  # the harness starts its clock here, imports done
    train(model, task, cfg, OptimConfig(lr=3e-3, warmup_steps=10), out_dir=out)


def _launch(out: Path, resume: bool, marker: Path, steps: int) -> subprocess.Popen:
    marker.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, __file__, "--worker", str(out), "--resume", str(int(resume)),
                             "--marker", str(marker), "--steps", str(steps)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_marker(proc, marker: Path) -> bool:
    while not marker.exists():
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return True


def _check_latest(out: Path) -> str | None:
    """None if `latest` names a complete, verified checkpoint (or none exists yet); else what is wrong."""
    from attnlab.errors import UserError
    from attnlab.models.lm import LM, LMConfig
    from attnlab.training.checkpoint import load_train_state, load_weights

    latest = out / "checkpoints" / "latest"
    if not latest.is_file():
        return None if not list(out.glob("checkpoints/step_*")) else "checkpoints without `latest`"
    ck = out / "checkpoints" / latest.read_text().strip()
    try:
        load_weights(LM(LMConfig(vocab_size=64, n_layer=2, n_head=2, d_model=64, max_seq_len=64)), ck)
        load_train_state(ck)
    except UserError as e:
        return str(e)
    return None


def _rows(out: Path) -> list[dict]:
    from attnlab.training.logging import read_jsonl

    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(out / "metrics.jsonl")]


def _tb(out: Path) -> dict:
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # it reports each purge a resume asked for

    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if t not in TIMING}


def _same_state(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
        return False
    sa = torch.load(a / "train_state.pt", weights_only=True)
    sb = torch.load(b / "train_state.pt", weights_only=True)
    sa.pop("metrics_bytes"), sb.pop("metrics_bytes")  # rows carry wall-clock fields of different lengths
    return _equal(sa, sb)


def _equal(x, y) -> bool:
    import torch

    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return isinstance(y, (list, tuple)) and len(x) == len(y) and all(map(_equal, x, y))
    return x == y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default="", help="work folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--worker", default="")
    ap.add_argument("--resume", type=int, default=0)
    ap.add_argument("--marker", default="")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, bool(a.resume), a.marker, a.steps)
        return
    rng = random.Random(a.seed)
    root = Path(a.dir or tempfile.mkdtemp(prefix="kill_resume_"))
    root.mkdir(parents=True, exist_ok=True)
    ref, run, marker = root / "ref", root / "run", root / "started"
    for p in (ref, run):
        shutil.rmtree(p, ignore_errors=True)

    t0 = time.perf_counter()
    proc = _launch(ref, False, marker, a.steps)
    _wait_marker(proc, marker)
    t_start = time.perf_counter()
    if proc.wait() != 0:
        sys.exit(f"reference run failed: {proc.stderr.read()[-2000:]}")
    train_s = time.perf_counter() - t_start
    # Delays spread the kills over the first part of the run (each attempt gets ~1/(2K+2) of its length on
    # average, a little of which is lost to the kill), so that all K kills land before it can finish.
    span = train_s / (a.kills + 1)

    kills = during_write = restarts = attempts = 0
    problems: list[str] = []
    killed_after: list[int] = []  # the step of the newest checkpoint at each kill
    finished = False
    while not finished:
        attempts += 1
        from attnlab.training.rundir import latest_complete

        resume = run.exists() and latest_complete(run) is not None
        if run.exists() and not resume:
            shutil.rmtree(run)  # killed before its first checkpoint: the folder is not a run yet
            restarts += 1
        proc = _launch(run, resume, marker, a.steps)
        if kills >= a.kills:
            finished = proc.wait() == 0
            if not finished:
                problems.append(f"final attempt failed: {proc.stderr.read()[-500:]}")
                break
            continue
        if not _wait_marker(proc, marker):
            problems.append(f"attempt {attempts} failed: {proc.stderr.read()[-500:]}")
            break
        time.sleep(rng.uniform(0, span))
        if kills % 2 == 1:  # wait for a checkpoint write to be under way
            ckdir = run / "checkpoints"
            while proc.poll() is None and not (ckdir.is_dir() and any(ckdir.glob(".tmp_step_*"))):
                time.sleep(0.0005)
        if proc.poll() is None:
            writing = (run / "checkpoints").is_dir() and any((run / "checkpoints").glob(".tmp_step_*"))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            during_write += writing
            latest = run / "checkpoints" / "latest"
            killed_after.append(int(latest.read_text().strip()[5:]) if latest.is_file() else 0)
            bad = _check_latest(run)
            if bad:
                problems.append(f"after kill {kills}: {bad}")
        else:
            finished = proc.returncode == 0
            if not finished:
                problems.append(f"attempt {attempts} failed: {proc.stderr.read()[-500:]}")
                break

    last = f"step_{a.steps:06d}"
    checks = {
        "metrics rows": _rows(run) == _rows(ref),
        "tensorboard scalars": _tb(run) == _tb(ref),
        "weights and optimizer state": _same_state(ref / "checkpoints" / last, run / "checkpoints" / last),
        "latest": (run / "checkpoints" / "latest").read_text().strip() == last,
        "no partial files": not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")],
    }
    failed = [k for k, ok in checks.items() if not ok] + problems
    summary = {"kills": kills, "kills_during_checkpoint_write": during_write, "restarts_from_scratch": restarts,
               "attempts": attempts, "latest_checkpoint_at_each_kill": killed_after, "steps": a.steps,
               "identical": not failed, "failures": failed,
               "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary))
    print(f"kill_resume: {kills} SIGKILLs ({during_write} during a checkpoint write, {restarts} before the first "
          f"checkpoint), {attempts} attempts: " + ("final metrics, TensorBoard, weights and optimizer state "
                                                  "identical to the uninterrupted run; no partial files"
                                                  if not failed else "FAILED: " + "; ".join(failed)))
    if not a.dir:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
