"""`attnlab run deploy --quick` at a few steps: every stage is measured, the int8 copies are int8 and small,
and the distilled students are paired with their scratch twins."""

import csv
import json

import pytest

from attnlab.cli import main


@pytest.mark.slow
def test_deploy_pipeline_writes_every_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 60)
    out = tmp_path / "d"
    assert main(["run", "deploy", "--data", str(text), "--out", str(out), "--quick", "true", "--teacher_steps", "2",
                 "--student_steps", "2", "--eval_batches", "1", "--gen_tokens", "4", "--d_model", "16",
                 "--n_head", "2", "--seq_len", "16", "--batch_size", "2"]) == 0
    stages = {r["stage"]: r for r in csv.DictReader(open(out / "stages.csv"))}
    assert len(stages) == 8 and (out / "stages.png").is_file()
    for fp32, int8 in (("teacher fp32", "teacher int8"),
                       ("student kv_shift distilled fp32", "student kv_shift distilled int8")):
        assert float(stages[int8]["bytes"]) < 0.5 * float(stages[fp32]["bytes"])
        assert abs(float(stages[int8]["val_loss"]) - float(stages[fp32]["val_loss"])) < 0.02 * float(stages[fp32]["val_loss"])
    assert float(stages["student vanilla scratch fp32"]["params"]) < float(stages["teacher fp32"]["params"])
    students = list(csv.DictReader(open(out / "students.csv")))
    assert {(r["student"], r["how"]) for r in students} == {(s, h) for s in ("vanilla", "kv_shift")
                                                             for h in ("scratch", "distilled")}
    summary = json.loads((out / "summary.json").read_text())
    for row in summary["comparison"]:
        assert abs(row["distilled_minus_scratch"] - (row["distilled"] - row["scratch"])) < 1e-9
    record = json.loads(next((out / "int8" / "teacher" / "checkpoints").glob("step_*/config.json")).read_text())
    assert record["quantized"]["scheme"] == "dynamic"
