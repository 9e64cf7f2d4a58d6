"""Distillation: the loss against float64 math, the task with every mechanism, and `attnlab distill` end to end."""

import json

import pytest
import torch

from attnlab.attention import AttentionSpec
from attnlab.attention.registry import kernels
from attnlab.cli import main
from attnlab.models.lm import LM, LMConfig
from attnlab.tasks.distill import DistillTask, distill_loss


def _reference(s, y, t_logits, alpha, T, mask):
    """Per position in plain float64 loops: α·T²·Σ p_T log(p_T/q_T) + (1−α)·(−log q_1[y]), mean over kept."""
    s, t_logits = s.double(), t_logits.double()
    kl = ce = 0.0
    n = 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not mask[b, i]:
                continue
            p = torch.exp(t_logits[b, i] / T) / torch.exp(t_logits[b, i] / T).sum()
            q = torch.exp(s[b, i] / T) / torch.exp(s[b, i] / T).sum()
            kl += float((p * (p.log() - q.log())).sum())
            ce += float(-(s[b, i, y[b, i]] - torch.logsumexp(s[b, i], 0)))
            n += 1
    return alpha * T * T * kl / n + (1 - alpha) * ce / n, ce / n, kl / n


@pytest.mark.parametrize("alpha,T", [(0.5, 2.0), (1.0, 1.0), (0.0, 3.0), (0.3, 0.7)])
def test_loss_matches_float64_reference(alpha, T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g) * 2, torch.randn(2, 5, 11, generator=g) * 2
    y = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.3
    got = distill_loss(s, y, t, alpha=alpha, temperature=T, loss_mask=mask)
    want = _reference(s, y, t, alpha, T, mask)
    for a, b in zip(got, want):
        assert float(a) == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_top_k_with_every_token_is_the_full_loss_and_truncation_renormalises():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 4, 9, generator=g), torch.randn(1, 4, 9, generator=g)
    y = torch.randint(0, 9, (1, 4), generator=g)
    full = distill_loss(s, y, t, alpha=0.7, temperature=2.0)[0]
    logp, idx = torch.log_softmax(t, -1).topk(9, -1)
    assert float(distill_loss(s, y, (logp, idx), alpha=0.7, temperature=2.0)[0]) == pytest.approx(float(full), rel=1e-5)
    # k = 3: p_T renormalised over the teacher's 3 tokens, q_T the student's full softmax at those tokens
    logp, idx = torch.log_softmax(t, -1).topk(3, -1)
    kl = distill_loss(s, y, (logp, idx), alpha=1.0, temperature=2.0)[2]
    p = torch.softmax(logp.double() / 2, -1)
    q = torch.log_softmax(s.double() / 2, -1).gather(-1, idx)
    assert float(kl) == pytest.approx(float((p * (p.log() - q)).sum(-1).mean()), rel=1e-5)


def test_a_student_equal_to_its_teacher_has_zero_kl():
    t = torch.randn(2, 3, 7)
    assert float(distill_loss(t.clone(), torch.zeros(2, 3, dtype=torch.long), t, alpha=1, temperature=3)[2]) < 1e-6


class _Task:
    metrics = ("val_loss",)

    def batch(self, step, micro, rank, device):
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, 23, (2, 16), generator=g)
        return {"x": x, "y": torch.roll(x, -1, 1)}


@pytest.mark.parametrize("name", sorted(n for n, e in kernels().items() if e.caps.causal))  # an LM needs causal
@pytest.mark.parametrize("transform", ["none", "kv_shift"])
def test_every_mechanism_learns_from_the_teacher(name, transform):
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=23, n_layer=1, n_head=2, d_model=16, max_seq_len=16,
                   attention=AttentionSpec(name=name, transform=transform))
    teacher, student = LM(LMConfig(vocab_size=23, n_layer=2, n_head=2, d_model=16, max_seq_len=16)), LM(cfg)
    task = DistillTask(_Task(), teacher, alpha=1.0, temperature=2.0)
    loss, n = task.loss(student, task.batch(0, 0, 0, "cpu"))
    loss.backward()
    assert n == 32 and torch.isfinite(loss) and loss > 0
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())


TINY = ["--model.n_layer", "1", "--model.n_head", "2", "--model.d_model", "16", "--model.max_seq_len", "16",
        "--train.batch_size", "4", "--train.eval_every", "0", "--train.progress", "false", "--data.eval_batches", "2"]


@pytest.fixture
def teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 80)
    out = tmp_path / "teacher"
    assert main(["train", "--out", str(out), "--data.path", str(text), "--data.tokenizer", "char",
                 "--model.n_layer", "2", "--model.n_head", "2", "--model.d_model", "32", "--model.max_seq_len", "16",
                 "--train.batch_size", "4", "--train.steps", "3", "--train.eval_every", "0",
                 "--train.progress", "false", "--data.eval_batches", "2"]) == 0
    return out, text


def _summary(capsys):
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_distilled_student_is_an_ordinary_run_and_the_cache_replays_the_teacher(teacher, tmp_path, capsys):
    t, _ = teacher
    capsys.readouterr()
    finals = []
    for name, extra in (("a", []), ("b", ["--teacher_cache", str(tmp_path / "tc")]),
                        ("c", ["--teacher_cache", str(tmp_path / "tc")])):
        assert main(["distill", "--teacher", str(t), "--out", str(tmp_path / name), "--top_k", "4",
                     "--train.steps", "3", "--model.attention.transform", "kv_shift", *TINY, *extra]) == 0
        finals.append(_summary(capsys)["val_loss"])
        if name == "b":
            cached = sorted((tmp_path / "tc").iterdir())
            assert len(cached) == 3
    assert sorted((tmp_path / "tc").iterdir()) == cached  # the third run read every batch from the cache
    assert finals[0] == finals[1] == finals[2]
    record = json.loads((tmp_path / "a" / "checkpoints" / "step_000003" / "config.json").read_text())
    assert record["run"]["distill"]["top_k"] == 4
    assert main(["eval", "--ckpt", str(tmp_path / "a"), "--batches", "1"]) == 0
    assert main(["generate", "--ckpt", str(tmp_path / "a"), "--prompt", "To", "--max_new_tokens", "3"]) == 0


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnlab: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_teachers_are_one_line_and_a_larger_student_is_noted(teacher, tmp_path, capsys):
    t, text = teacher
    capsys.readouterr()
    assert main(["distill", "--teacher", str(tmp_path / "none"), "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "not found" in _err(capsys)
    assert main(["distill", "--teacher", str(t), "--out", str(tmp_path / "x"), "--data.path", str(text),
                 "--data.tokenizer", "byte", *TINY]) == 2
    assert "vocabulary" in _err(capsys)
    assert main(["distill", "--teacher", str(t), "--out", str(tmp_path / "x"), "--teacher_cache", "c", *TINY]) == 2
    _err(capsys)
    assert main(["distill", "--teacher", str(t), "--out", str(tmp_path / "big"), "--train.steps", "1",
                 *TINY, "--model.d_model", "64", "--model.n_layer", "3"]) == 0
    err = capsys.readouterr().err
    assert "larger than its teacher" in err and len(err.strip().splitlines()) == 1
