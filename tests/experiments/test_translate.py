import json
import math

import pytest
import torch

from attnlab.data.parallel import NumberTaskConfig
from attnlab.run.experiment import run_experiment
from attnlab.experiments.translate import TranslateConfig, paper_optim
from attnlab.tasks.translation import translation_scores
from attnlab.models.seq2seq import Seq2SeqConfig
from attnlab.training.schedules import lr_at


@pytest.mark.parametrize("d_model,warmup", [(512, 4000), (128, 400)])
def test_the_experiment_trains_with_the_papers_optimiser_and_schedule(d_model, warmup):
    # lrate = d_model^-0.5 · min(step_num^-0.5, step_num · warmup_steps^-1.5), step_num counted from 1.
    o = paper_optim(d_model, warmup)
    assert (o.beta1, o.beta2, o.eps, o.weight_decay, o.grad_clip) == (0.9, 0.98, 1e-9, 0.0, 0.0)
    for step in [0, 1, 10, warmup - 2, warmup - 1, warmup, 3 * warmup, 100_000]:
        t = step + 1
        paper = d_model ** -0.5 * min(t ** -0.5, t * warmup ** -1.5)
        got = lr_at(step, schedule=o.schedule, lr=o.lr, min_lr=o.min_lr, warmup=o.warmup_steps, total=10 ** 6)
        assert got == pytest.approx(paper, rel=1e-12)
    assert paper_optim(d_model, warmup, 2.0).lr == pytest.approx(2 * o.lr)


def test_translation_scores():
    # Corpus BLEU needs 4-grams somewhere: one reference is long enough.
    refs = ["deux cent mille trois cent cinq", "mille un"]
    assert translation_scores(refs, refs) == pytest.approx({"bleu": 100.0, "chrf": 100.0, "exact": 100.0})
    assert translation_scores(["deux  cent mille trois cent cinq", "mille un"], refs)["exact"] == 100.0
    s = translation_scores(["deux cent mille trois cent cinq", "mille deux"], refs)
    assert s["exact"] == 50.0 and 0 < s["bleu"] < 100


def test_tiny_end_to_end_run(tmp_path):
    torch.set_num_threads(1)
    cfg = TranslateConfig(
        out=str(tmp_path / "run"), task=NumberTaskConfig(high=999, n_train=120, n_valid=8, n_test=12),
        model=Seq2SeqConfig(n_layer=1, n_head=2, d_model=16, d_ff=32, max_seq_len=40), bpe_vocab_size=300,
        steps=6, eval_every=6, save_every=2, average_last=3, warmup=3, max_tokens=256, beam_size=2, lstm_baseline=True)
    summary = run_experiment("translate", cfg)
    assert set(summary["test"]) == {"greedy", "beam2", "avg3+greedy", "avg3+beam2", "lstm greedy", "lstm beam2"}
    assert summary["lstm_baseline"]["params"] > 0  # matching itself is tested in tests/models/test_rnn.py
    assert summary["averaged_checkpoints"] == ["step_000002", "step_000004", "step_000006"]
    for row in summary["test"].values():
        assert 0.0 <= row["exact"] <= 100.0 and math.isfinite(row["bleu"])
    out = tmp_path / "run"
    assert (out / "report.md").is_file() and (out / "learning_curve.png").is_file()
    lines = (out / "test_translations.jsonl").read_text().splitlines()
    assert len(lines) == 12 and "reference" in json.loads(lines[0])
