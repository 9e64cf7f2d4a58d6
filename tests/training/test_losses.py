import math

import pytest
import torch
import torch.nn.functional as F

from attnlab.training.losses import label_smoothed_loss, smoothed_target_entropy


def test_matches_closed_form_for_one_peaked_row():
    # Target logit a, the V-1 others 0: p_y = e^a / (e^a + V - 1), p_other = 1 / (e^a + V - 1), so
    # loss = -(1 - ε + ε/V) log p_y - ε (V-1)/V log p_other.
    v, a, eps = 7, 2.5, 0.1
    logits = torch.zeros(1, v)
    logits[0, 3] = a
    z = math.exp(a) + v - 1
    expected = -(1 - eps + eps / v) * math.log(math.exp(a) / z) - eps * (v - 1) / v * math.log(1 / z)
    out = label_smoothed_loss(logits, torch.tensor([3]), eps)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.nll.item() == pytest.approx(-math.log(math.exp(a) / z), rel=1e-6)


def test_minimum_is_the_entropy_of_the_smoothed_target():
    v, eps = 11, 0.1
    q = torch.full((v,), eps / v)
    q[4] += 1 - eps
    logits = q.log()[None].requires_grad_(True)
    out = label_smoothed_loss(logits, torch.tensor([4]), eps)
    assert out.loss.item() == pytest.approx(smoothed_target_entropy(v, eps), rel=1e-6)
    out.loss.backward()
    assert logits.grad.abs().max().item() < 1e-6  # p = q is the stationary point


def test_no_smoothing_is_cross_entropy_and_padding_is_ignored():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 9)
    target = torch.randint(3, 9, (3, 5))
    target[1, 3:] = 0
    out = label_smoothed_loss(logits, target, 0.0, ignore_index=0)
    ref = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=0)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert out.tokens == 13
    # Smoothed, it agrees with torch's own label smoothing (same uniform-over-V convention).
    sm = label_smoothed_loss(logits, target, 0.1, ignore_index=0)
    ref = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=0, label_smoothing=0.1)
    assert sm.loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_rejects_bad_epsilon():
    with pytest.raises(ValueError):
        label_smoothed_loss(torch.zeros(1, 3), torch.tensor([0]), 1.0)
