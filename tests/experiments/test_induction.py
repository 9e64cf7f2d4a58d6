"""Smoke runs of the KV-shift experiments (`induction`, `kvshift-lm`) on tiny settings, and their helpers."""

import json

import pytest
import torch

from attnlab.attention import AttentionSpec
from attnlab.cli import main
from attnlab.errors import UserError
from attnlab.experiments.kvshift_lm import KVShiftLMConfig, table4_counts
from attnlab.run.build import build_model
from attnlab.run.inspect import shift_coefficients
from attnlab.run.experiment import run_experiment
from attnlab.models.lm import LMConfig


def test_induction_cli_writes_results(tmp_path):
    out = tmp_path / "ind"
    rc = main(["run", "induction", "--out", str(out), "--layers", "[1]", "--vocab_size", "16", "--seq_len", "16",
               "--mqar_kv_pairs", "2", "--d_model", "16", "--n_head", "2", "--batch_size", "4", "--max_steps", "4",
               "--eval_every", "2", "--eval_batches", "1", "--warmup_steps", "1"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["results"]
    assert [(r["task"], r["model"]) for r in rows] == [
        ("induction", "vanilla-1L"), ("induction", "kv_shift-1L"), ("mqar", "vanilla-1L"), ("mqar", "kv_shift-1L")]
    for r in rows:
        assert 0.0 <= r["final_accuracy"] <= 1.0 and r["steps"] == 4
    # The KV-shift model has exactly four more parameters per KV head.
    assert rows[1]["params"] - rows[0]["params"] == 4 * 2
    assert any(c.startswith("1-layer KV-shift") for c in summary["claims"])
    assert (out / "induction_accuracy.png").stat().st_size > 0 and (out / "mqar_accuracy.png").stat().st_size > 0
    assert "Claims" in (out / "report.md").read_text()


def test_kvshift_lm_quick_run(tmp_path):
    text = tmp_path / "tiny.txt"
    torch.manual_seed(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    text.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (1500,)).tolist()))
    out = tmp_path / "lm"
    summary = run_experiment("kvshift-lm", KVShiftLMConfig(out=str(out), data=str(text), quick=True, steps=6))
    res = summary["results"]
    assert set(res) == {"vanilla", "kv_shift", "k_only", "v_only", "window2"}
    assert res["vanilla"]["seeds"] == 2 and res["kv_shift"]["seeds"] == 2 and res["window2"]["seeds"] == 1
    assert res["vanilla"]["delta_mean"] == 0.0
    # Two layers x four KV heads x two seeds, each counted once.
    assert sum(summary["table4"].values()) == 2 * 4 * 2
    assert (out / "val_loss.png").is_file() and (out / "coefficients.csv").is_file()


def test_kvshift_lm_needs_data(tmp_path):
    with pytest.raises(UserError):
        run_experiment("kvshift-lm", KVShiftLMConfig(out=str(tmp_path)))
    with pytest.raises(UserError):
        run_experiment("kvshift-lm", KVShiftLMConfig(out=str(tmp_path), data=str(tmp_path / "missing.txt")))


def test_variants_of_a_seed_share_their_initial_weights():
    base = LMConfig(vocab_size=16, n_layer=2, n_head=2, d_model=16, max_seq_len=16)
    vanilla = build_model(base, 3, paired=True)
    shifted = build_model(LMConfig(**{**base.__dict__, "attention": AttentionSpec(transform="kv_shift")}), 3, paired=True)
    other = build_model(base, 4, paired=True)
    sv, ss = vanilla.state_dict(), shifted.state_dict()
    assert set(ss) - set(sv) == {f"blocks.{i}.attn.transform.{p}" for i in range(2) for p in ("alpha", "beta")}
    assert all(torch.equal(sv[k], ss[k]) for k in sv)
    assert not torch.equal(sv["embed.weight"], other.state_dict()["embed.weight"])
    rows = shift_coefficients(shifted)
    assert [(r["layer"], r["head"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_table4_counts_each_quadrant():
    rows = [{"alpha_0": a0, "alpha_1": a1, "beta_0": b0, "beta_1": b1}
            for a0, a1, b0, b1 in [(0.9, 0.1, 0.8, 0.2), (0.9, 0.1, 0.2, 0.8), (0.1, 0.9, 0.2, 0.8),
                                   (0.1, 0.9, 0.2, 0.8), (0.5, 0.5, 0.5, 0.5)]]
    assert table4_counts(rows) == {"a1>a2,b1>b2": 1, "a1>a2,b1<=b2": 1, "a1<=a2,b1>b2": 0, "a1<=a2,b1<=b2": 3}
