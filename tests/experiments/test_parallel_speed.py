import math

import pytest
import torch

from attnlab.experiments.parallel import ParallelConfig, build_models, crossing, fit_exponent
from attnlab.run.experiment import run_experiment


def test_fit_exponent_recovers_a_power_law():
    ns = [64, 128, 256, 512]
    assert fit_exponent(ns, [3e-6 * n ** 1.7 for n in ns]) == pytest.approx(1.7)
    assert math.isnan(fit_exponent([64], [1.0]))


def test_crossing_is_log_interpolated():
    ns = [100, 1000]
    # a/b goes from 2 to 1/2: equal at the geometric middle.
    assert crossing(ns, [2.0, 0.5], [1.0, 1.0]) == pytest.approx(math.sqrt(100 * 1000))
    assert crossing(ns, [2.0, 3.0], [1.0, 1.0]) is None


def test_models_have_matched_parameter_counts():
    models, width = build_models(ParallelConfig(d_model=256, n_layer=4, lengths=[32]))
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    # Widths go in steps of 8, which moves an LSTM of this size by about 2 %: half a step at most.
    assert abs(counts["lstm"] - counts["transformer"]) / counts["transformer"] < 0.01
    assert models["lstm"].cfg.d_model == width


def test_tiny_run_writes_its_report(tmp_path):
    torch.set_num_threads(1)
    cfg = ParallelConfig(out=str(tmp_path), lengths=[16, 32], d_model=32, n_layer=1, n_head=2, tokens_per_batch=64,
                         repeats=1, reference_length=32, reference_threads=[1])
    s = run_experiment("parallel", cfg)
    assert s["ratio_at_reference"]["n"] == 32 and s["ratio_at_reference"]["train_tokens_per_s_ratio"] > 0
    assert set(s["exponents"]) == {"transformer", "lstm"}
    assert len(s["by_threads_at_reference"]) == 1
    assert (tmp_path / "report.md").read_text().count("Table 1") == 1
    assert (tmp_path / "train_tokens_per_s.png").is_file()
