"""Experiments: one module per paper claim, registered by name with a typed config.

An experiment is a function `run(cfg, ctx) -> dict` whose dict holds its headline figures, named; the runner
writes it to OUT/summary.json. The experiment writes its report (OUT/report.md), plots (PNG) and raw metrics
(CSV/JSONL) through `ctx`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..training.device import resolve_device


@dataclass
class ExperimentConfig:
    out: str = ""  # output folder (required)
    quick: bool = False  # a reduced run of a few minutes, for CI
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0


@dataclass
class Experiment:
    name: str
    config_cls: type
    fn: Callable
    help: str


_EXPERIMENTS: dict[str, Experiment] = {}


def experiment(name: str, config_cls: type = ExperimentConfig, help: str = ""):
    if not issubclass(config_cls, ExperimentConfig):
        raise TypeError(f"{config_cls.__name__} must subclass ExperimentConfig")

    def deco(fn):
        if name in _EXPERIMENTS:
            raise ValueError(f"experiment {name!r} registered twice")
        _EXPERIMENTS[name] = Experiment(name, config_cls, fn, help or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


def experiments() -> dict[str, Experiment]:
    import importlib
    import pkgutil

    from .. import experiments as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    return dict(_EXPERIMENTS)


class Context:
    """Where an experiment writes, and on what it runs."""

    def __init__(self, cfg: ExperimentConfig):
        if not cfg.out:
            raise UserError("--out is required")
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device, self.amp = resolve_device(cfg.device, cfg.dtype)
        self.report = Report(self.out)

    def write_jsonl(self, name: str, rows: list[dict]) -> Path:
        p = self.out / name
        with open(p, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        return p

    def write_csv(self, name: str, rows: list[dict]) -> Path:
        p = self.out / name
        cols = list(dict.fromkeys(k for r in rows for k in r))
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        return p


class Report:
    """Builds report.md piece by piece; `save()` writes it."""

    def __init__(self, out: Path):
        self.out = out
        self.parts: list[str] = []

    def h(self, text: str, level: int = 2):
        self.parts.append("#" * level + " " + text)

    def p(self, text: str):
        self.parts.append(text)

    def table(self, rows: list[dict], columns: list[str] | None = None, fmt: str = "{:.4g}"):
        self.parts.append(markdown_table(rows, columns, fmt))

    def image(self, path: Path, caption: str = ""):
        self.parts.append(f"![{caption}]({Path(path).name})")

    def save(self) -> Path:
        p = self.out / "report.md"
        p.write_text("\n\n".join(self.parts) + "\n")
        return p


def markdown_table(rows: list[dict], columns: list[str] | None = None, fmt: str = "{:.4g}") -> str:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        if isinstance(v, float):
            return fmt.format(v)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def line_plot(path: Path, series: dict[str, tuple[list, list]], *, xlabel: str, ylabel: str, title: str = "",
              logx: bool = False, logy: bool = False) -> Path:
    """One PNG with a line per series: {label: (xs, ys)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def run_experiment(name: str, cfg: ExperimentConfig) -> dict:
    exps = experiments()
    if name not in exps:
        raise UserError(f"unknown experiment {name!r}; choose one of: {', '.join(sorted(exps))}")
    torch.manual_seed(cfg.seed)
    ctx = Context(cfg)
    t0 = time.time()
    summary = exps[name].fn(cfg, ctx)
    summary = {"experiment": name, "quick": cfg.quick, "device": str(ctx.device), "wall_s": round(time.time() - t0, 1),
               "config": dataclasses.asdict(cfg), **summary}
    (ctx.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
