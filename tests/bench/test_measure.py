import math
import mmap
import subprocess
import sys
import time

import pytest
import torch

from attnlab.bench.measure import clock, interleaved, mean_std, page_faults, paired_difference
from attnlab.errors import UserError

CPU = torch.device("cpu")


def test_interleaved_takes_turns_and_alternates():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "AB"}
    times = interleaved(fns, 4, CPU, warmup=2, alternate=True)
    assert calls == list("ABAB") + list("ABBAABBA")  # two warm-up rounds, then A B, B A, A B, B A
    assert {k: len(v) for k, v in times.items()} == {"A": 4, "B": 4}
    calls.clear()
    interleaved(fns, 2, CPU, warmup=0)
    assert calls == list("ABAB")


def test_cpu_clock_does_not_count_sleeping():
    times = interleaved({"sleep": lambda: time.sleep(0.05)}, 1, CPU, clock_kind="cpu", warmup=0)
    assert times["sleep"][0] < 0.02
    times = interleaved({"sleep": lambda: time.sleep(0.05)}, 1, CPU, clock_kind="wall", warmup=0)
    assert times["sleep"][0] >= 0.05


def test_bad_clocks_are_user_errors():
    with pytest.raises(UserError):
        clock("gpu", CPU)
    with pytest.raises(UserError):
        clock("cpu", torch.device("cuda"))


def test_statistics():
    assert mean_std([2.0]) == (2.0, 0.0)
    mean, sd = mean_std([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0 and math.isclose(sd, math.sqrt(14 / 3))
    diff, se = paired_difference([3.0, 5.0, 4.0], [1.0, 2.0, 3.0])
    assert diff == 2.0 and math.isclose(se, 1.0 / math.sqrt(3))


def test_page_faults_count_fresh_pages():
    def fresh_mapping():  # 16 MiB of new pages, one byte written in each
        m = mmap.mmap(-1, 16 << 20)
        m[::4096] = bytes(4096)
        m.close()

    assert page_faults(fresh_mapping) >= 4096
    held = bytearray(16 << 20)  # mapped once, then written again and again
    assert page_faults(lambda: held.__setitem__(slice(None, None, 4096), bytes(4096))) < 64


def test_keeping_freed_memory_serves_large_blocks_from_a_heap_that_is_never_trimmed():
    # In a child process: the setting holds for the rest of the process. glibc's own counters tell where a
    # block came from: by default one of 30 MiB is a fresh mapping, unmapped when freed.
    code = """
import ctypes, ctypes.util, sys, torch
from attnlab.bench.measure import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    keep_freed_memory()
before = libc.mallinfo2()
block = torch.ones(30 << 18)
during = libc.mallinfo2()
del block
after = libc.mallinfo2()
print(during.hblkhd - before.hblkhd, during.arena - before.arena, during.arena - after.arena)
"""
    got = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        got[mode] = [int(v) >> 20 for v in out.stdout.split()]  # MiB: mapped, heap growth, heap handed back
    assert got["default"][0] == 30
    assert got["keep"] == [0, 30, 0]
