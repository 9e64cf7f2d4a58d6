"""The one evaluation: every mode and ensemble size on text and synthetic tasks, checked against the
definitions (mean negative log-likelihood over the scored positions)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnlab.data import ByteTokenizer, TextCorpus
from attnlab.errors import UserError
from attnlab.models.lm import LM, LMConfig
from attnlab.run.evaluate import evaluate
from attnlab.tasks import SyntheticConfig, SyntheticTask, TextLMTask


def _lm(vocab, name="exact", **opts):
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=vocab, n_layer=1, n_head=2, d_model=16, max_seq_len=32)
    cfg.attention.name, cfg.attention.options = name, opts
    return LM(cfg)


@pytest.fixture
def text_task(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    corpus = TextCorpus(text, ByteTokenizer(), cache_dir=tmp_path / "cache")
    return TextLMTask(corpus, 32, 4)


def test_dense_loss_is_the_mean_token_nll(text_task):
    model = _lm(256).eval()
    m = evaluate(model, text_task, batches=2)
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in text_task.eval_batches("val", 2):
            logits = model(b["x"]).double()
            nll += float(F.cross_entropy(logits.flatten(0, 1), b["y"].flatten(), reduction="sum"))
            n += b["y"].numel()
    assert m["tokens"] == n
    assert m["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert m["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_ensemble_of_one_sample_pass_differs_from_dense_and_k_changes_it(text_task):
    model = _lm(256, "ssa", factor=4)
    dense = evaluate(model, text_task, mode="dense", batches=2)
    auto = evaluate(model, text_task, batches=2)  # SSA evaluates dense in eval mode
    assert auto["loss"] == pytest.approx(dense["loss"], rel=1e-6)
    one = evaluate(model, text_task, mode="sample", batches=2, seed=1)
    assert one["loss"] != pytest.approx(dense["loss"], rel=1e-6)
    k3 = evaluate(model, text_task, ensemble=3, batches=2, seed=1)  # ensemble implies sample mode
    assert k3["loss"] != pytest.approx(one["loss"], rel=1e-6) and math.isfinite(k3["loss"])


def test_synthetic_accuracy_counts_scored_positions_only():
    model = _lm(16)
    syn = SyntheticTask(SyntheticConfig(kind="induction", vocab_size=16, seq_len=32, eval_batches=2), 4)
    m = evaluate(model, syn)
    correct = scored = 0
    with torch.no_grad():
        for b in syn.eval_batches():
            pred = model(b["x"]).argmax(-1)
            mask = b["loss_mask"]
            correct += int((pred == b["y"])[mask].sum())
            scored += int(mask.sum())
    assert m["tokens"] == scored < 2 * 4 * 32
    assert m["accuracy"] == pytest.approx(correct / scored)


@pytest.mark.parametrize("kw", [{"ensemble": 0}, {"mode": "fast"}])
def test_bad_arguments_are_one_line_errors(text_task, kw):
    with pytest.raises(UserError):
        evaluate(_lm(256), text_task, **kw)
