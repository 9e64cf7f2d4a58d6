"""A run folder has one owner: one run writes it from its first file to its last checkpoint.

A new run refuses a folder that is not empty; a resumed run needs a complete checkpoint, cuts the logs back to
it, removes what interrupted writes left, and refuses settings that would make it a different run.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .checkpoint import _atomic_write_text, list_checkpoints, remove_partial
from .distributed import is_main

TRAINER_FILES = ("checkpoints", "metrics.jsonl", "tb")
CHECKPOINT_FILES = ("model.safetensors", "config.json", "train_state.pt")

# Settings that change what a step computes; a resumed run that changed one would not be the same run.
# train.steps may change (a run is extended), as may logging, evaluation, saving and the device.
TRAJECTORY = {
    "optim": None,  # every field
    "train": ("batch_size", "grad_accum", "seed", "dtype", "dense_finetune_steps"),
    "run": None,  # model, data and a kind's own top-level settings (an image run's label_smoothing)
    "world": None,
}


def latest_complete(out: Path) -> Path | None:
    """The newest checkpoint of `out` that holds every file a resume needs, or None."""
    for ck in reversed(list_checkpoints(out)):
        if all((ck / f).is_file() for f in CHECKPOINT_FILES):
            return ck
    return None


def claim_run_dir(out, resume: bool) -> Path:
    """Check that this run may write into `out` before anything is written there; create it for a new run.

    New run (resume=False): `out` must be absent or empty. Resume: `out` must hold a complete checkpoint.
    Raises UserError with one line saying how to proceed. Only the main process checks and creates (under
    torchrun the other ranks return at once: they write nothing, and would see rank 0's first files).
    """
    out = Path(out).expanduser()
    if not is_main():
        return out
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a run folder; choose another --out")
    if resume:
        if latest_complete(out) is None:
            raise UserError(f"--train.resume: {out} holds no complete checkpoint to resume from; "
                            f"start a new run with another --out, or remove {out}")
        return out
    if out.is_dir() and any(out.iterdir()):
        ck = latest_complete(out)
        if ck is not None:
            raise UserError(f"{out} already holds a run (last checkpoint {ck.name}); continue it with "
                            f"--train.resume true, or choose another --out")
        raise UserError(f"{out} is not empty but holds no checkpoint to resume from (a run stopped before its "
                        f"first checkpoint, or other files); remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def open_run(out: Path, resume: bool, main: bool) -> Path | None:
    """The trainer's own check: the checkpoint to resume from (None for a new run); tidies it up on resume."""
    if not resume:
        # Only the main process looks: the others could already see the files it has started to write.
        found = [f for f in TRAINER_FILES if (out / f).exists()] if main else []
        if found:
            raise UserError(f"{out} already holds a run ({', '.join(found)}); continue it with --train.resume true, "
                            f"or choose another --out")
        return None
    ck = latest_complete(out)
    if ck is None:
        raise UserError(f"--train.resume: {out} holds no complete checkpoint to resume from; "
                        f"start a new run with another --out, or remove {out}")
    if main:
        remove_partial(out)
        latest = out / "checkpoints" / "latest"
        if not latest.is_file() or latest.read_text().strip() != ck.name:
            _atomic_write_text(latest, ck.name)  # an interruption between rename and pointer update
    return ck


def check_resume_config(saved: dict, current: dict, override: bool) -> None:
    """Refuse to resume with settings that alter the trajectory, unless `override`."""
    current = json.loads(json.dumps(current))  # tuples -> lists, as the saved JSON holds them
    changes = []
    for section, keys in TRAJECTORY.items():
        old, new = saved.get(section), current.get(section)
        if old is None or new is None:  # a checkpoint from before this setting was recorded
            continue
        if not isinstance(old, dict) or not isinstance(new, dict):
            if old != new:
                changes.append((section, old, new))
            continue
        for key in keys if keys is not None else sorted(set(old) & set(new)):
            if key in old and key in new:
                changes += _diff(f"{section}.{key}", old[key], new[key])
    if not changes or override:
        return
    shown = ", ".join(f"{_option(k)} {a!r} -> {b!r}" for k, a, b in changes[:4])
    more = f" and {len(changes) - 4} more" if len(changes) > 4 else ""
    raise UserError(f"resume would change settings of the checkpointed run ({shown}{more}); the result would not "
                    f"be the same run: restore them, or pass --train.resume_override true to continue with the new "
                    f"ones")


def _diff(name: str, old, new) -> list[tuple[str, object, object]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) & set(new)):
            out += _diff(f"{name}.{k}", old[k], new[k])
        return out
    return [] if old == new else [(name, old, new)]


def _option(name: str) -> str:
    """A recorded setting as the command line spells it: run.model.d_model -> model.d_model."""
    return name.removeprefix("run.")
