"""`attnlab run compare` (what `make demo` runs) on a tiny setting: every mechanism joins by itself (analysis
tools such as the pruning kernel study trained models and are left out)."""

import json

from attnlab.attention import kernels, transforms
from attnlab.cli import main


def test_compare_trains_every_registered_mechanism_and_transform(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["run", "compare", "--out", str(out), "--steps", "3", "--eval_every", "3", "--n_layer", "1",
               "--d_model", "16", "--n_head", "2", "--batch_size", "2", "--task.vocab_size", "16",
               "--task.seq_len", "32", "--task.eval_batches", "1"])
    assert rc == 0
    results = json.loads((out / "summary.json").read_text())["results"]
    causal = {n for n, e in kernels().items() if e.caps.causal and not e.caps.analysis}
    expected = causal | {f"{k}+{t}" for k in causal for t in transforms()}
    assert set(results) == expected
    for name, row in results.items():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["steps"] == 3
        assert row["tokens_per_s"] > 0 and row["step_peak_mem_MB"] > 0
    # Kernels add no parameters; KV shifting adds four per key/value head and layer.
    assert len({results[k]["params"] for k in causal}) == 1
    for k in causal:
        assert results[f"{k}+kv_shift"]["params"] == results[k]["params"] + 4 * 2
    printed = capsys.readouterr().out
    assert all(name in printed for name in expected)
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "compare.csv").is_file()
    assert "| mechanism |" in (out / "report.md").read_text()
