"""`attnlab run vit-ssa --quick` on small synthetic IDX files: every variant trains, fine-tunes and is scored
under every inference mode, over two seeds."""

import json

import numpy as np

from attnlab.cli import main
from attnlab.data.images import write_idx


def _idx(root, n_train=160, n_test=64, size=8):
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 40, (n, size, size))
        for i, c in enumerate(y):
            x[i, :, 2 * c: 2 * c + 2] += 200
        write_idx(root / f"{split}-images-idx3-ubyte.gz", x.astype(np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", y.astype(np.uint8))
    return root


def test_quick_ssa_variants_finetunes_and_ensembles(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["run", "vit-ssa", "--quick", "--out", str(out), "--data", str(_idx(tmp_path / "idx")),
               "--steps", "6", "--eval_every", "3", "--patch_size", "2", "--ensemble_k", "[1, 3]"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    labels = ["dense", "ssa-unbiased S=2", "ssa-unbiased S=4", "ssa-local S=2", "ssa-local S=4"]
    assert list(s["summary"]) == labels
    assert len(s["runs"]) == 2 * len(labels) and {r["seed"] for r in s["runs"]} == {0, 1}
    for r in s["runs"]:
        assert r["steps"] == 6 and r["step_s"] > 0 and r["peak_MB"] > 0
        assert all(0 <= r[k] <= 1 for k in ("dense_eval", "finetuned"))
        assert ("ensemble_K3" in r) == (r["variant"] != "dense")
    assert len(s["claims"]) == 4 and s["finetune_steps"] == 1
    for f in ("report.md", "val_loss.png", "inference_modes.png", "runs.csv"):
        assert (out / f).stat().st_size > 0
    assert (out / "runs" / "ssa-local_S=4+ft-s1" / "checkpoints").is_dir()
