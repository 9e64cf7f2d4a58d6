"""`attnlab run pathways --quick` on a tiny text, and the pieces it reports with."""

import json

import torch

from attnlab.cli import main
from attnlab.experiments.pathways import smallest_within


def test_smallest_within_needs_every_larger_fraction_to_stay_within():
    rows = [{"keep": k, "loss": l} for k, l in [(0.1, 1.0), (0.2, 1.5), (0.5, 1.005), (1.0, 1.0)]]
    assert smallest_within(rows, 1.0, 0.01) == 0.5  # 0.1 is within, but 0.2 above it is not
    assert smallest_within(rows, 1.0, 0.6) == 0.1
    assert smallest_within([{"keep": 1.0, "loss": 2.0}], 1.0, 0.01) is None


def test_quick_pathways_writes_curves_for_both_models_and_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "tiny.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text("".join(chr(97 + int(i)) for i in torch.randint(0, 8, (4000,), generator=g)))
    out = tmp_path / "pw"
    assert main(["run", "pathways", "--quick", "--out", str(out), "--data", str(text), "--steps", "3",
                 "--induction_steps", "3", "--eval_batches", "1", "--batch_size", "2", "--n_layer", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["task"], r["trained"]) for r in summary["summary"]} == {
        ("text", "dense"), ("text", "ssa"), ("induction", "dense"), ("induction", "ssa")}
    rows = (out / "pruning.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 2 * 3  # 4 models × (topk, random) × 3 fractions
    # keep = 1 is exact attention whichever method prunes: both methods give the same full loss.
    full = {}
    for line in rows[1:]:
        task, trained, method, keep, loss, _ = line.split(",")
        if float(keep) == 1.0:
            full.setdefault((task, trained), set()).add(round(float(loss), 5))
    assert all(len(v) == 1 for v in full.values())
    assert (out / "text_loss.png").is_file() and (out / "induction_accuracy.png").is_file()
    # The induction models carry the KV shift by default (vanilla attention needs two layers to learn the task).
    record = json.loads(next((out / "runs" / "induction-dense").rglob("config.json")).read_text())
    assert record["run"]["model"]["attention"]["transform"] == "kv_shift"


def test_bad_options_are_one_line(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("abc" * 100)
    for extra in (["--methods", "[top]"], ["--fractions", "[0]"], ["--induction_transform", "shift"],
                  ["--induction_layers", "0"]):
        assert main(["run", "pathways", "--out", str(tmp_path / "o"), "--data", str(text), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0
    assert main(["run", "pathways", "--out", str(tmp_path / "o2")]) == 2
    assert "--data" in capsys.readouterr().err
