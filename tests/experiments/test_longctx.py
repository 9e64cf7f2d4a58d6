"""Smoke run of the `longctx` experiment on a tiny setting."""

import json

import torch

from attnlab.cli import main


def test_longctx_cli_writes_perplexities_gap_shares_and_errors(tmp_path):
    text = tmp_path / "tiny.txt"
    torch.manual_seed(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    text.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (4000,)).tolist()))
    out = tmp_path / "lc"
    rc = main(["run", "longctx", "--data", str(text), "--out", str(out), "--context", "160", "--n_layer", "2",
               "--n_head", "2", "--d_model", "16", "--batch_size", "2", "--steps", "3", "--eval_every", "3",
               "--eval_windows", "2", "--error_seeds", "1", "--prescore", '["norm", "kmeans"]',
               "--hyper", '{"block_size": 16, "sample_size": 16, "min_seq_len": 32, "lsh_bits": 3}'])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["perplexity"]
    assert rows[0]["variant"] == "exact" and rows[0]["ppl"] > 1
    # Every layer choice (last half, first half, all) with plain hyper and each method.
    assert {(r["layers"], r["variant"]) for r in rows[1:]} == {
        (l, v) for l in ("last:1", "first:1", "all") for v in ("hyper", "hyper+norm", "hyper+kmeans")}
    # Hyper actually approximates here, and pre-scoring is compared with it at an equal key budget.
    assert any(abs(r["ppl"] - rows[0]["ppl"]) > 1e-6 for r in rows[1:])
    assert {e["variant"] for e in summary["errors"]} == {"hyper", "hyper zero-pad", "hyper+norm", "hyper+kmeans"}
    assert summary["ppl_base"] == "e"
    report = (out / "report.md").read_text()
    assert "e-based" in report and (out / "perplexity.png").stat().st_size > 0
    assert (out / "train" / "checkpoints").is_dir()
    # The trained model can be evaluated again without training.
    again = tmp_path / "again"
    rc = main(["run", "longctx", "--data", str(text), "--out", str(again), "--checkpoint", str(out / "train"),
               "--context", "160", "--eval_windows", "2", "--error_seeds", "1", "--prescore", '["norm"]',
               "--layers", '["all"]', "--hyper", '{"block_size": 16, "sample_size": 16, "min_seq_len": 32}'])
    assert rc == 0
    s2 = json.loads((again / "summary.json").read_text())
    assert s2["train_steps"] == 0 and abs(s2["ppl_exact"] - summary["ppl_exact"]) < 1e-6
    assert {g["method"] for g in s2["gap_recovered"]} <= {"norm"}
