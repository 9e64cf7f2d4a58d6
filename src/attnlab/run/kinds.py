"""Run kinds: what `--task` selects. A kind ties a run config (out, model, data, train, optim) to how its
model, tokenizer and task are built, how a finished run is loaded, and what `attnlab eval` reports for it.
Adding a model family or a task is adding a kind here (one module and one line in `_BUILTINS`)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from ..errors import UserError


@dataclass
class Kind:
    name: str
    config_cls: type
    """the run config: fields out, model, data, train, optim"""
    build: Callable
    """build(cfg, run_dir, *, fresh) -> Built(model, tokenizer, task, config)"""
    load: Callable
    """load(record, ckpt, run_dir) -> LoadedRun"""
    evaluate: Callable
    """evaluate(run: LoadedRun, cfg: commands.evaluate.Config, device, amp) -> dict of metrics"""
    help: str = ""


_KINDS: dict[str, Kind] = {}
_BUILTINS = ("attnlab.run.lm", "attnlab.run.image", "attnlab.run.forecast")


def register(kind: Kind) -> Kind:
    if kind.name in _KINDS:
        raise ValueError(f"run kind {kind.name!r} registered twice")
    _KINDS[kind.name] = kind
    return kind


def kinds() -> dict[str, Kind]:
    for module in _BUILTINS:
        importlib.import_module(module)
    return dict(_KINDS)


def kind(name: str) -> Kind:
    known = kinds()
    if name not in known:
        raise UserError(f"unknown task {name!r}; choose one of: {', '.join(sorted(known))}")
    return known[name]


def task_of(argv: list[str], default: str = "lm") -> str:
    """The `--task` named on a command line (`--task X` or `--task=X`), else the default: it picks the config
    schema before the rest of the line is parsed."""
    for i, a in enumerate(argv):
        if a == "--task" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--task="):
            return a.split("=", 1)[1]
    return default
