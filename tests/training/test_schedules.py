import math

import pytest

from attnlab.training.schedules import lr_at, noam_peak_lr


def test_inverse_sqrt_matches_the_transformer_paper():
    d_model, warmup = 512, 4000
    lr = noam_peak_lr(d_model, warmup)
    for step in [0, 1, 99, 3999, 4000, 10_000, 99_999]:
        t = step + 1
        paper = d_model ** -0.5 * min(t ** -0.5, t * warmup ** -1.5)
        got = lr_at(step, schedule="inverse_sqrt", lr=lr, min_lr=0, warmup=warmup, total=100_000)
        assert got == pytest.approx(paper, rel=1e-12)


def test_cosine_warms_up_then_decays_to_min_lr():
    kw = dict(schedule="cosine", lr=1e-3, min_lr=1e-4, warmup=10, total=110)
    assert lr_at(0, **kw) == pytest.approx(1e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)
    assert lr_at(59, **kw) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(109, **kw) == pytest.approx(1e-4)
    values = [lr_at(s, **kw) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))
