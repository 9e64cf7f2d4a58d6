import csv
import json

import pytest
import torch

from attnlab.attention import exact_attention, kernels
from attnlab.run.experiment import run_experiment
from attnlab.bench.attention import _predict, fit_n2
from attnlab.bench.errors import capture_qkv, logit_offset_stats, offset_qkv, shift_keys
from attnlab.bench.variants import BenchConfig, check_variant_labels, variants
from attnlab.errors import UserError
from attnlab.models.lm import LM, LMConfig

TINY = dict(heads=2, head_dim=8, error_seeds=2, error_lengths=[150],
            error_options={"hyper": {"block_size": 16, "sample_size": 16, "min_seq_len": 32}},
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
    assert "hyper zero-pad" in {v.label for v in variants(cfg, "error")}
    with pytest.raises(UserError):
        variants(BenchConfig(mechanisms=["nope"]))
    extra = variants(BenchConfig(**TINY, extra={"hyper small": {"name": "hyper", "block_size": 8}}))
    assert [(v.name, v.options) for v in extra if v.label == "hyper small"] == [("hyper", {"block_size": 8})]
    with pytest.raises(UserError):
        variants(BenchConfig(extra={"x": {"block_size": 8}}))
    # Derived variants come from the mechanism's kernel class and can be chosen by label.
    assert all(v.base == v.name for v in variants(cfg) if v.base)
    assert not any(v.base for v in variants(BenchConfig(**TINY, variants=[])))
    chosen = variants(BenchConfig(**TINY, variants=["hyper+norm"]), "error")
    assert [v.label for v in chosen if v.base] == ["hyper+norm"]
    with pytest.raises(UserError):
        check_variant_labels(BenchConfig(variants=["hyper+nope"]))


def test_bench_writes_every_mechanism_with_errors_against_exact(tmp_path):
    out = tmp_path / "b"
    run_experiment("attention", BenchConfig(out=str(out), lengths=[96, 160], time_limit_s=30, clock="cpu", **TINY))
    rows = list(csv.DictReader(open(out / "speed.csv")))
    assert {r["variant"] for r in rows} >= set(kernels())
    for r in rows:
        if r["variant"] == "exact":
            assert float(r["rel_err_gaussian"]) == 0.0
        assert float(r["time_s"]) > 0
    hyper = [r for r in rows if r["variant"] == "hyper" and r["n"] == "160"]
    assert len(hyper) == 2 and all(float(r["rel_err_gaussian"]) > 0 for r in hyper)  # it approximates
    for r in rows:
        if r["variant"].startswith("hyper+"):
            plain = next(p for p in rows if p["variant"] == "hyper" and (p["mode"], p["n"]) == (r["mode"], r["n"]))
            assert float(r["overhead_vs_hyper"]) == pytest.approx(float(r["time_s"]) / float(plain["time_s"]) - 1)
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


def test_error_study_reads_q_k_v_from_a_saved_checkpoint(tmp_path):
    from dataclasses import asdict

    from attnlab.bench.errors import captured_from_checkpoint, error_rows
    from attnlab.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    mcfg = LMConfig(n_layer=2, n_head=2, d_model=16, max_seq_len=64)
    model = LM(mcfg)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    save_checkpoint(tmp_path / "run", 1, model, {"run": {"model": asdict(mcfg), "data": {"path": str(text)}}})
    cfg = BenchConfig(checkpoint=str(tmp_path / "run"), capture_len=150, error_lengths=[], mechanisms=["hyper"],
                      variants=["hyper zero-pad", "hyper+norm"], **{k: v for k, v in TINY.items() if k not in ("error_lengths",)})
    q, k, v, causal, what = captured_from_checkpoint(cfg, torch.device("cpu"))
    assert q.shape == (1, 2, 150, 8) and causal and "150 tokens of t.txt" in what
    rows = error_rows(cfg, torch.device("cpu"), torch.float32)
    assert {r["variant"] for r in rows} == {"hyper", "hyper zero-pad", "hyper+norm"}
    assert all(r["source"].startswith("trained LM") for r in rows)
    zp = next(r for r in rows if r["variant"] == "hyper zero-pad" and r["mode"] == "causal")
    assert 0 < zp["padded_rows_share"] < 1  # 150 is not a multiple of the block: some rows see padding


def test_key_offsets_leave_exact_attention_alone_and_shift_the_mean_logit_as_asked():
    cfg = BenchConfig(heads=4, kv_heads=2, head_dim=8, error_query_mean=2.0)
    q, k, v = offset_qkv(cfg, 50, 0, "cpu", torch.float64)
    for off in (-6.0, 3.0):
        k2 = shift_keys(q, k, off)
        torch.testing.assert_close(exact_attention(q, k2, v, causal=True), exact_attention(q, k, v, causal=True))
        mean, sd = logit_offset_stats(q, k2)
        assert mean - logit_offset_stats(q, k)[0] == pytest.approx(off) and sd > 0
    with pytest.raises(UserError):
        offset_qkv(BenchConfig(error_query_mean=0.0), 10, 0, "cpu", torch.float32)
