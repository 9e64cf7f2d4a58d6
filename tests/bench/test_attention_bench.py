import csv
import json

import pytest
import torch

from attnlab.attention import exact_attention, kernels
from attnlab.bench.attention import BenchConfig, _predict, bench_attention, capture_qkv, fit_n2, variants
from attnlab.errors import UserError
from attnlab.models.lm import LM, LMConfig

TINY = dict(heads=2, head_dim=8, error_seeds=2, error_lengths=[150],
            error_options={"block_size": 16, "sample_size": 16, "min_seq_len": 32},
            options={"hyper": {"block_size": 16, "sample_size": 16, "min_seq_len": 64}})


def test_fitted_n2_and_the_next_time_prediction():
    pts = [(1000, 2.0), (2000, 8.0), (4000, 32.0)]
    assert fit_n2(pts) == pytest.approx(2e-6)
    assert _predict(pts, 8000) == pytest.approx(128.0)
    assert _predict([(1000, 1.0), (2000, 2.0)], 4000) == pytest.approx(4.0)  # linear stays linear
    assert _predict([], 10) == 0.0


def test_variants_cover_the_registry_and_keep_an_equal_key_budget():
    cfg = BenchConfig(**TINY)
    labels = {v.label: v for v in variants(cfg)}
    assert set(kernels()) <= {v.name for v in labels.values()}
    for m in ("kmeans", "kmedian", "leverage", "norm"):
        o = labels[f"hyper+{m}"].options
        assert o["top_k"] + o["sample_size"] == 16 and o["prescore"] == m
    assert "hyper zero-pad" in {v.label for v in variants(cfg, error_study=True)}
    with pytest.raises(UserError):
        variants(BenchConfig(mechanisms=["nope"]))


def test_bench_writes_every_mechanism_with_errors_against_exact(tmp_path):
    out = bench_attention(BenchConfig(out=str(tmp_path / "b"), lengths=[96, 160], time_limit_s=30, **TINY))
    rows = list(csv.DictReader(open(out / "speed.csv")))
    assert {r["variant"] for r in rows} >= set(kernels())
    for r in rows:
        if r["variant"] == "exact":
            assert float(r["rel_err_gaussian"]) == 0.0
        assert float(r["time_s"]) > 0
    hyper = [r for r in rows if r["variant"] == "hyper" and r["n"] == "160"]
    assert len(hyper) == 2 and all(float(r["rel_err_gaussian"]) > 0 for r in hyper)  # it approximates
    errs = list(csv.DictReader(open(out / "errors.csv")))
    assert {"hyper", "hyper zero-pad", "hyper+kmeans"} <= {r["variant"] for r in errs}
    for name in ("report.md", "time.png", "memory.png", "summary.json"):
        assert (out / name).is_file()
    assert json.loads((out / "summary.json").read_text())["speed"]


def test_captured_qkv_are_what_the_kernel_sees():
    torch.manual_seed(0)
    model = LM(LMConfig(n_layer=2, n_head=2, d_model=16, max_seq_len=64)).eval()
    seen = {}
    model.blocks[1].attn.kernel.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    (q, k, v), causal = capture_qkv(model, torch.randint(0, 256, (1, 40)), layer=-1)
    assert causal and q.shape == (1, 2, 40, 8)
    torch.testing.assert_close(exact_attention(q, k, v, causal=True), seen["out"])
