"""Experiments and benchmarks: entries in one registry, each a function `fn(cfg, ctx) -> dict` over a typed
config. The dict holds the headline figures and goes to OUT/summary.json; the report (OUT/report.md), plots
and raw CSV/JSONL go through `ctx.report`. `ctx.train` trains one variant of a run config into OUT/runs/NAME,
so an experiment declares its variants as small functions over one base config and never assembles model,
task and trainer by hand.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from ..errors import UserError
from ..report import Report
from ..training import train
from ..training.device import resolve_device
from .build import build, build_task, corpus_for, run_record, tokenizer_for
from .config import DataConfig, RunConfig, with_train

Kind = Literal["experiment", "benchmark"]


@dataclass
class ExperimentConfig:
    out: str = ""
    """output folder (required; must not hold an earlier run)"""
    quick: bool = False
    """a reduced run of a few minutes, for CI"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N"""
    dtype: str = "auto"
    """autocast dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16"""
    seed: int = 0
    """seed of every run in the experiment (weights, batches, sampling)"""


@dataclass
class Entry:
    name: str
    config_cls: type
    fn: Callable
    help: str
    kind: Kind


_ENTRIES: dict[str, Entry] = {}
# Explicit registration: an experiment is its module plus one line here.
_BUILTINS = ("attnlab.experiments.compare", "attnlab.experiments.induction", "attnlab.experiments.kvshift_lm",
             "attnlab.experiments.ssa", "attnlab.experiments.longctx", "attnlab.experiments.translate",
             "attnlab.experiments.parallel", "attnlab.experiments.forecast", "attnlab.experiments.pathways",
             "attnlab.experiments.deploy", "attnlab.experiments.vit_prescore", "attnlab.experiments.vit_ssa",
             "attnlab.experiments.adapt",
             "attnlab.bench.attention", "attnlab.bench.kv_shift",
             "attnlab.bench.prescore", "attnlab.bench.ssa_speed", "attnlab.bench.hf_sweep",
             "attnlab.bench.quantize")


def experiment(name: str, config_cls: type = ExperimentConfig, help: str = "", kind: Kind = "experiment"):
    if not issubclass(config_cls, ExperimentConfig):
        raise TypeError(f"{config_cls.__name__} must subclass ExperimentConfig")

    def deco(fn):
        if name in _ENTRIES:
            raise ValueError(f"experiment {name!r} registered twice")
        _ENTRIES[name] = Entry(name, config_cls, fn, help or (fn.__doc__ or "").strip().splitlines()[0], kind)
        return fn

    return deco


def entries(kind: Kind | None = None) -> dict[str, Entry]:
    for module in _BUILTINS:
        importlib.import_module(module)
    return {n: e for n, e in _ENTRIES.items() if kind is None or e.kind == kind}


class Context:
    """Where an experiment writes, on what it runs, and how it trains its variants."""

    def __init__(self, cfg: ExperimentConfig, name: str = "this experiment"):
        if not cfg.out:
            raise UserError("--out is required")
        self.out = Path(cfg.out)
        if self.out.is_file() or (self.out.is_dir() and any(self.out.iterdir())):
            raise UserError(f"{self.out} is not empty: an experiment writes into a folder of its own; choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg, self.name = cfg, name
        self.device, self.amp = resolve_device(cfg.device, cfg.dtype)
        self.report = Report(self.out)

    def text(self, path: str, **data):
        """The experiment's `--data` text, read once for all its runs: (DataConfig(path, **data), tokenizer,
        tokenised corpus)."""
        if not path:
            raise UserError(f"{self.name} needs --data FILE (a text file or folder)")
        data = DataConfig(path=path, **data)
        tok = tokenizer_for(data)
        return data, tok, corpus_for(data, tok)

    def train(self, cfg: RunConfig, name: str, *, model=None, task=None, paired: bool = False, corpus=None,
              tokenizer=None, record: bool = False, under: str = "runs"):
        """Train the run `cfg` into OUT/UNDER/NAME on this experiment's device.

        The model and task are built from `cfg` (seeded by cfg.train.seed; `paired`: see run.build.build_model)
        unless given. record: save the run and data config with the checkpoints, so `attnlab eval` can load
        the run later. Returns (model, task, TrainResult)."""
        cfg = with_train(cfg, device=str(self.device), dtype=self.cfg.dtype)
        if model is None:
            built = build(cfg, paired=paired, corpus=corpus, tokenizer=tokenizer)
            model, task, cfg = built.model, task or built.task, built.config
        elif task is None:
            task = build_task(cfg.data, model.cfg, cfg.train.batch_size, cfg.train.seed, tokenizer, corpus=corpus)
        out = self.out / under / name
        res = train(model, task, cfg.train, cfg.optim, out_dir=out, run_config=run_record(cfg) if record else None)
        return model, task, res


def run_experiment(name: str, cfg: ExperimentConfig) -> dict:
    known = entries()
    if name not in known:
        raise UserError(f"unknown experiment {name!r}; choose one of: {', '.join(sorted(known))}")
    torch.manual_seed(cfg.seed)
    ctx = Context(cfg, name)
    t0 = time.time()
    summary = known[name].fn(cfg, ctx)
    summary = {"experiment": name, "quick": cfg.quick, "device": str(ctx.device), "wall_s": round(time.time() - t0, 1),
               "config": dataclasses.asdict(cfg), **summary}
    (ctx.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
