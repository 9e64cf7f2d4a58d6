"""Smoke runs of the small benchmark entries at tiny sizes, through the CLI, checking what they write."""

import csv
import json

import pytest

from attnlab.cli import main


def _rows(path):
    return list(csv.DictReader(open(path)))


def test_kv_shift_overhead_times_both_models(tmp_path):
    out = tmp_path / "kv"
    assert main(["bench", "kv-shift-overhead", "--out", str(out), "--contexts", "[16, 32]", "--layers", "1",
                 "--d_model", "16", "--heads", "2", "--tokens", "64", "--rounds", "2", "--warmup", "1"]) == 0
    rows = _rows(out / "overhead.csv")
    assert [int(r["context"]) for r in rows] == [16, 32] and [int(r["batch"]) for r in rows] == [4, 2]
    for r in rows:
        assert float(r["vanilla_ms"]) > 0 and float(r["kv_shift_ms"]) > 0
        assert float(r["ratio"]) == pytest.approx(float(r["kv_shift_ms"]) / float(r["vanilla_ms"]))
    assert "ratio" in (out / "report.md").read_text()


def test_prescore_overhead_pairs_every_method_with_plain_hyper(tmp_path):
    out = tmp_path / "ps"
    assert main(["bench", "prescore-overhead", "--out", str(out), "--n", "[300]", "--modes", "[noncausal]",
                 "--methods", "[norm, kmedian]", "--heads", "1", "--head_dim", "8", "--rounds", "2"]) == 0
    rows = _rows(out / "overhead.csv")
    assert {r["variant"] for r in rows} == {"hyper", "hyper+norm", "hyper+kmedian", "hyper+kmedian(l1)"}
    times = {x["variant"]: x["times_s"] for x in map(json.loads, open(out / "times.jsonl"))}
    for r in rows:
        assert float(r["min_s"]) == pytest.approx(min(times[r["variant"]]))
        if r["variant"] != "hyper":
            assert float(r["overhead_of_minima"]) == pytest.approx(float(r["min_s"]) / min(times["hyper"]) - 1)
    assert main(["bench", "prescore-overhead", "--out", str(tmp_path / "bad"), "--methods", "[nope]"]) == 2


def test_ssa_speed_measures_attention_and_training_steps(tmp_path):
    out = tmp_path / "ssa"
    assert main(["bench", "ssa-speed", "--out", str(out), "--ns", "[64]", "--factors", "[2]", "--samplings",
                 "[unbiased]", "--heads", "2", "--head_dim", "8", "--repeats", "1", "--step_ns", "[32]",
                 "--layers", "1"]) == 0
    attn = _rows(out / "attention.csv")
    assert {r["kind"] for r in attn} == {"exact", "naive", "ssa:unbiased:2"}
    exact = next(r for r in attn if r["kind"] == "exact")
    assert float(exact["speedup_vs_exact"]) == 1.0 and float(exact["peak_MB"]) > 0
    steps = _rows(out / "train_step.csv")
    assert {r["model"] for r in steps} == {"dense", "ssa-unbiased-S4", "ssa-unbiased-S8", "ssa-local-S4"}
    assert json.loads((out / "summary.json").read_text())["env"]["batch"] == 1  # the CPU default


def test_hf_sweep_on_a_tiny_local_llama(tmp_path):
    pytest.importorskip("transformers")
    from attnlab.integrations.tiny_llama import make_tiny_llama

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    info = make_tiny_llama(text, tmp_path / "llama", layers=2, hidden=32, heads=2, kv_heads=1, context=32,
                           batch=2, steps=2, log=lambda m: None)
    assert info["steps_done"] == 2 and (tmp_path / "llama" / "heldout.txt").stat().st_size > 0
    out = tmp_path / "sweep"
    assert main(["bench", "hf-sweep", "--out", str(out), "--model", str(tmp_path / "llama"), "--data", str(text),
                 "--context", "64", "--windows", "1", "--last", "[1]", "--prescores", "[none, norm]",
                 "--hyper", '{"min_seq_len": 16, "block_size": 8, "sample_size": 8, "top_k": 4}']) == 0
    rows = _rows(out / "sweep.csv")
    assert [r["variant"] for r in rows] == ["exact", "hyper", "hyper+norm"]
    exact = rows[0]
    assert float(exact["ppl_patched"]) == pytest.approx(float(exact["ppl_unpatched"]), rel=1e-4)
    assert len(list((out / "runs").iterdir())) == 3
    assert main(["bench", "hf-sweep", "--out", str(tmp_path / "none")]) == 2


def test_quantize_bench_compares_every_route_with_fp32(tmp_path):
    out = tmp_path / "q"
    assert main(["bench", "quantize", "--out", str(out), "--d_model", "32", "--layers", "1", "--heads", "2",
                 "--vocab", "40", "--context", "16", "--batch", "2", "--gen_tokens", "4", "--rounds", "1",
                 "--eval_batches", "2"]) == 0
    rows = {r["variant"]: r for r in _rows(out / "quantize.csv")}
    assert {"fp32", "dynamic-fbgemm", "dynamic-int_mm", "weight-only"} <= set(rows)
    fp32 = rows["fp32"]
    for r in rows.values():
        assert float(r["eval_tok_s"]) > 0 and float(r["gen_tok_s"]) > 0
        assert float(r["eval_speedup"]) == pytest.approx(float(r["eval_tok_s"]) / float(fp32["eval_tok_s"]))
        assert abs(float(r["val_loss"]) - float(fp32["val_loss"])) < 0.01 * float(fp32["val_loss"])
        if r["variant"] != "fp32":  # int8 weights, fp32 scales and norms: well under half of fp32
            assert 0 < float(r["bytes"]) < 0.5 * float(fp32["bytes"])
