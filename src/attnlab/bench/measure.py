"""Repeated measurements: the clock, configurations timed in turns, and the summary statistics of the results.

On a CPU shared with other processes the wall clock mostly measures waiting, so on CPU the default clock is
this process's CPU time (all its threads); on CUDA it is the wall clock, after a synchronisation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import statistics
import sys
import time
from typing import Callable

import torch

from ..errors import UserError
from ..training.device import autocast
from ..training.trainer import OptimConfig, make_optimizer

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


def optimizer_step(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device, amp
                   ) -> Callable[[], None]:
    """A closure running one language-model training step (forward under autocast, backward, AdamW with the
    trainer's defaults) on fixed tokens."""
    opt = make_optimizer(model, OptimConfig())

    def step():
        with autocast(device, amp):
            _, loss = model(inputs, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def page_faults(fn: Callable[[], object], calls: int = 5) -> float:
    """Median minor page faults per call of `fn` (a fault is a fresh page the kernel maps for the process)."""
    import resource  # Unix only; imported here so the rest of the module works anywhere

    counts = []
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(counts)


def keep_freed_memory() -> None:
    """Make glibc keep freed memory in the process instead of handing it back to the kernel.

    glibc serves large blocks from fresh mappings and trims the top of its heap once enough is free, so a
    training step can spend much of its system time re-faulting the same pages, and how much depends on the
    heap's layout rather than on the work: two models in one process fault at very different rates that
    change from run to run. With trimming off and large blocks kept in the heap, a step's time measures its
    work. Applies to every allocation after the call; needs glibc.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    mallopt = getattr(libc, "mallopt", None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    # 32 MiB is the largest mmap threshold glibc accepts on 64-bit machines.
    if (not sys.platform.startswith("linux") or mallopt is None
            or not mallopt(m_mmap_threshold, 32 << 20) or not mallopt(m_trim_threshold, 1 << 30)):
        raise UserError("keeping freed memory needs the GNU C library (Linux)")


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a − b over paired measurements and its standard error."""
    mean, sd = mean_std([x - y for x, y in zip(a, b)])
    return mean, sd / math.sqrt(len(a))
