"""Repeated measurements: the clock, configurations timed in turns, and the summary statistics of the results.

On a CPU shared with other processes the wall clock mostly measures waiting, so on CPU the default clock is
this process's CPU time (all its threads); on CUDA it is the wall clock, after a synchronisation.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

from ..errors import UserError

CLOCKS = ("auto", "wall", "cpu")


def clock(kind: str, device: torch.device | str) -> Callable[[], float]:
    """'wall', 'cpu' (process CPU time, CPU devices only) or 'auto' (wall on CUDA, cpu otherwise)."""
    device = torch.device(device)
    if kind not in CLOCKS:
        raise UserError(f"clock must be one of {', '.join(CLOCKS)}, got {kind!r}")
    if kind == "cpu" and device.type != "cpu":
        raise UserError("clock cpu measures CPU devices only; use wall on CUDA")
    wall = kind == "wall" or (kind == "auto" and device.type == "cuda")
    return time.perf_counter if wall else time.process_time


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device, *, clock_kind="auto",
                warmup: int = 1, alternate: bool = False) -> dict[str, list[float]]:
    """Seconds of every call, per label: each round calls every function once, in turn, so that changes in
    the machine's load fall on all of them alike (`alternate`: every other round in reverse order, A B B A,
    so that neither is always first). `warmup` untimed rounds first (kernel choice, allocator)."""
    now = clock(clock_kind, device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {label: [] for label in fns}
    order = list(fns)
    for r in range(rounds):
        for label in (order[::-1] if alternate and r % 2 else order):
            sync(device)
            t0 = now()
            fns[label]()
            sync(device)
            times[label].append(now() - t0)
    return times


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a − b over paired measurements and its standard error."""
    mean, sd = mean_std([x - y for x, y in zip(a, b)])
    return mean, sd / math.sqrt(len(a))
