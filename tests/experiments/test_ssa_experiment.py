"""Smoke run of `attnlab run ssa` on a tiny text: every variant, every inference mode, the report."""

import json

import torch

from attnlab.cli import main


def test_ssa_experiment_writes_every_variant_and_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "tiny.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text("".join(chr(97 + int(i)) for i in torch.randint(0, 8, (6000,), generator=g)))
    out = tmp_path / "ssa"
    rc = main(["run", "ssa", "--out", str(out), "--data", str(text), "--seq_len", "32", "--n_layer", "1",
               "--d_model", "32", "--n_head", "2", "--batch_size", "2", "--steps", "4", "--eval_every", "2",
               "--eval_batches", "1", "--warmup_steps", "1", "--ensemble_k", "[1, 2]"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    runs = {r["variant"]: r for r in summary["runs"]}
    assert set(runs) == {"dense", "ssa-unbiased", "ssa-local", "ssa-local+ft"}
    # Eight symbols uniformly at random: every model's loss sits near ln 8 ≈ 2.08, far from 0 or ln 256.
    for r in runs.values():
        assert 1.0 < r["dense_eval_loss"] < 6.0 and r["step_s"] > 0
    # The dense model has no stochastic pass; every SSA model has one per ensemble size.
    assert runs["dense"]["ensemble_K1"] is None
    for name in ["ssa-unbiased", "ssa-local", "ssa-local+ft"]:
        assert all(1.0 < runs[name][f"ensemble_K{k}"] < 6.0 for k in (1, 2))
    assert (out / "report.md").read_text().count("|") > 10
    assert list(out.glob("*.png"))


def test_data_limited_ssa_compares_every_variant_at_its_best(tmp_path, monkeypatch):
    import math

    from attnlab.experiments.ssa_limited import limited_variants

    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "tiny.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text("".join(chr(97 + int(i)) for i in torch.randint(0, 8, (6000,), generator=g)))
    out = tmp_path / "lim"
    rc = main(["run", "ssa", "--out", str(out), "--data", str(text), "--train_fraction", "0.2", "--seq_len", "16",
               "--n_layer", "1", "--d_model", "16", "--n_head", "2", "--batch_size", "2", "--steps", "6",
               "--eval_every", "1", "--eval_batches", "1", "--warmup_steps", "1", "--seeds", "2", "--factors", "[2]",
               "--patience", "2", "--finetune_fraction", "0.5"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    labels = [v[0] for v in limited_variants([2])]
    assert [r["variant"] for r in summary["table"]] == labels
    assert len(summary["runs"]) == 2 * len(labels) and summary["train_tokens"] == int(6000 * 0.9 * 0.2)
    for r in summary["runs"]:
        # The reported loss is the minimum of the run's own evaluations, and training stopped at most
        # `patience` evaluations after it.
        name = f"seed{r['seed']}-{r['variant'].replace(' ', '_').replace('=', '')}"
        evals = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        losses = [e["eval/val_loss"] for e in evals if "eval/val_loss" in e]
        assert math.isclose(r["best_val_loss"], min(losses), rel_tol=1e-9)
        assert r["steps"] - r["best_step"] <= 2
    for row in summary["table"]:
        runs = [r["best_val_loss"] for r in summary["runs"] if r["variant"] == row["variant"]]
        assert math.isclose(row["best_val_mean"], sum(runs) / 2, rel_tol=1e-9)
    # The control: dense gets the same fine-tune, and every variant is also compared against it.
    assert labels[:2] == ["dense", "dense+ft"]
    dense_ft = summary["table"][1]["best_val_mean"]
    for row in summary["table"]:
        assert math.isclose(row["vs_dense_ft_rel"], (row["best_val_mean"] - dense_ft) / dense_ft, rel_tol=1e-9)
