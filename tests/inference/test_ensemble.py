"""Self-ensembles: probability averaging, NaN guard, LM metrics per inference mode, classification."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnlab.attention import build_kernel, set_attention_mode
from attnlab.errors import UserError
from attnlab.inference.ensemble import (
    attention_mode,
    ensemble_classify,
    ensemble_log_probs,
    evaluate_lm,
)
from attnlab.models.lm import LM, LMConfig


def tiny_lm(factor=4):
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=16, n_layer=2, n_head=2, d_model=16, max_seq_len=32)
    cfg.attention.name = "ssa"
    cfg.attention.options = {"factor": factor}
    return LM(cfg)


def test_averages_probabilities_not_logits():
    passes = [torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 4.0, -8.0]]), torch.tensor([[0.0, 0.0, 0.0]])]
    it = iter(passes)
    out = ensemble_log_probs(lambda: next(it), 3)
    want = torch.stack([F.softmax(p, -1) for p in passes]).mean(0)
    torch.testing.assert_close(out.log_probs.exp(), want)
    assert not torch.allclose(want, F.softmax(torch.stack(passes).mean(0), -1))  # the two differ here
    assert out.passes.tolist() == [3]


def test_nan_guard_leaves_out_bad_passes_per_position():
    good = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    bad = good.clone()
    bad[0, 0] = float("nan")
    it = iter([good, bad])
    out = ensemble_log_probs(lambda: next(it), 2)
    assert out.passes.tolist() == [1, 2]
    torch.testing.assert_close(out.log_probs[0], F.log_softmax(good[0], -1))  # only the finite pass
    torch.testing.assert_close(out.log_probs[1], F.log_softmax(good[1], -1))
    nan = torch.full((1, 2), float("nan"))
    out = ensemble_log_probs(lambda: nan, 3)
    assert out.passes.tolist() == [0] and bool(torch.isnan(out.log_probs).all())


def test_tiny_probabilities_stay_finite():
    logits = torch.tensor([[0.0, -200.0]])
    out = ensemble_log_probs(lambda: logits, 4)
    assert float(out.log_probs[0, 1]) == pytest.approx(-200.0, abs=1e-3)


def test_lm_ensemble_equals_manual_average_and_restores_state():
    model = tiny_lm()
    x = torch.randint(0, 16, (3, 32))
    y = torch.randint(0, 16, (3, 32))
    k, seed = 4, 11
    rng_before = torch.get_rng_state()
    got = evaluate_lm(model, [(x, y)], mode="sample", k=k, seed=seed)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG stream is untouched
    assert all(m.attn.kernel.mode == "auto" for m in model.blocks)  # modes restored
    assert model.training  # training flag restored

    model.eval()
    set_attention_mode(model, "sample")
    with torch.no_grad():
        torch.manual_seed(seed)
        probs = torch.stack([F.softmax(model(x), -1) for _ in range(k)]).mean(0)
        torch.manual_seed(seed)
        singles = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for _ in range(k)]
    want = -probs.gather(-1, y.unsqueeze(-1)).log().mean().item()
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(want), rel=1e-5)
    assert got["tokens"] == x.numel() and got["k"] == k and got["dropped_tokens"] == 0
    # The K passes are stochastic (they differ), and averaging probabilities can only lower the mean loss of
    # the passes it averages (Jensen).
    assert len(set(singles)) > 1
    assert got["loss"] <= sum(singles) / k + 1e-6


def test_dense_mode_is_exact_single_pass_and_k_is_ignored():
    model = tiny_lm()
    x = torch.randint(0, 16, (2, 32))
    y = torch.randint(0, 16, (2, 32))
    mask = torch.rand(2, 32) > 0.3
    dense = evaluate_lm(model, [{"x": x, "y": y, "loss_mask": mask}], mode="dense", k=8)
    model.eval()
    with attention_mode(model, "dense"), torch.no_grad():
        _, loss = model(x, y, loss_mask=mask)
    assert dense["k"] == 1 and dense["tokens"] == int(mask.sum())
    assert dense["loss"] == pytest.approx(loss.item(), rel=1e-5)
    one = evaluate_lm(model, [(x, y)], mode="sample", k=1, seed=0)
    assert one["loss"] != pytest.approx(evaluate_lm(model, [(x, y)], mode="dense")["loss"], rel=1e-6)


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.kernel = build_kernel("ssa", {"factor": 4})
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        q = x.unsqueeze(1)
        return self.head(self.kernel(q, q, q, causal=False).squeeze(1).mean(1))


def test_classification_ensemble():
    torch.manual_seed(0)
    model = TinyClassifier()
    x = torch.randn(5, 32, 8)
    p1 = ensemble_classify(model, x, k=1, seed=0)
    p16 = ensemble_classify(model, x, k=16, seed=0)
    torch.testing.assert_close(p16.sum(-1), torch.ones(5))
    assert model.kernel.mode == "auto"
    # The 16-pass average is closer to a 256-pass average than a single pass is.
    p_ref = ensemble_classify(model, x, k=256, seed=1)
    assert (p16 - p_ref).abs().mean() < (p1 - p_ref).abs().mean()
    dense = ensemble_classify(model, x, k=4, mode="dense")
    model.eval()
    with attention_mode(model, "dense"), torch.no_grad():
        torch.testing.assert_close(dense, F.softmax(model(x), -1))
    with pytest.raises(UserError):
        ensemble_classify(model, x, k=0)
