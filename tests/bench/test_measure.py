import math
import time

import pytest
import torch

from attnlab.bench.measure import clock, interleaved, mean_std, paired_difference
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
