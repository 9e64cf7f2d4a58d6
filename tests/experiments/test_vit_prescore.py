"""`attnlab run vit-prescore --quick` on small synthetic IDX files: every method and budget is scored, a budget
of every key is the exact model, and the report, CSV and plot are written."""

import json

import numpy as np

from attnlab.cli import main
from attnlab.data.images import write_idx


def _idx(root, n_train=160, n_test=64, size=8):
    """Class c lights rows 2c, 2c+1 of noisy 8×8 images (three classes)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 40, (n, size, size))
        for i, c in enumerate(y):
            x[i, 2 * c: 2 * c + 2] += 200
        write_idx(root / f"{split}-images-idx3-ubyte", x.astype(np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte", y.astype(np.uint8))
    return root


def test_quick_prescore_sweep_and_scratch_model(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["run", "vit-prescore", "--quick", "--out", str(out), "--data", str(_idx(tmp_path / "idx")),
               "--steps", "8", "--budgets", "[2, 8, 100]", "--methods", "[kmeans, leverage, random]",
               "--scratch_budget", "4"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["tokens"] == 17  # 8×8 in 2×2 patches + the class token
    exact = s["exact_accuracy"]["accuracy"]
    table = s["accuracy_by_budget"]
    assert {(r["method"], r["budget"]) for r in table} == {(m, b) for m in ("kmeans", "leverage", "random")
                                                            for b in (2, 8, 17)}
    for r in table:
        assert r["seeds"] == 2 and r["accuracy_se"] is not None and 0 <= r["accuracy"] <= 1
        if r["budget"] == 17:  # every key: the exact model's own figure
            assert r["accuracy"] == exact
    assert set(s["budget_keeping"]) == {"kmeans", "leverage", "random"}
    evals = {(x["model"], x["eval"]) for x in s["scratch"]}
    assert ("trained with the selection", "selection") in evals and ("exact-trained", "selection swapped in") in evals
    report = (out / "report.md").read_text()
    assert "Smallest budget keeping" in report and "accuracy_vs_budget.png" in report
    assert (out / "accuracy_vs_budget.png").stat().st_size > 0 and (out / "evals.csv").is_file()
    # The trained runs are recorded as image runs: `attnlab eval` loads them.
    assert main(["eval", "--ckpt", str(out / "runs" / "exact-s0"), "--split", "test"]) == 0


def test_missing_data_is_one_line(tmp_path, capsys):
    assert main(["run", "vit-prescore", "--quick", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs --data" in err and "\n" not in err
