"""Attention maps and per-head statistics of `attnlab inspect`, on hand-built models and maps."""

import math

import pytest
import torch

from attnlab.attention import exact_attention
from attnlab.attention.swap import attention_layers
from attnlab.cli import main
from attnlab.models.lm import LM, LMConfig
from attnlab.run.inspect import (
    attention_maps,
    head_scores,
    induction_targets,
    repeated_random_tokens,
)


def _prev_token_lm(n=16, sharp=60.0):
    """One layer, two heads of width n on learned one-hot positions: head 0's query at i is the key of i−1,
    scaled by `sharp`, so it attends to i−1; head 1 has zero queries, so it attends uniformly."""
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=8, n_layer=1, n_head=2, d_model=2 * n, max_seq_len=n, pos="learned")
    m = LM(cfg).eval()
    attn = attention_layers(m)[0]
    with torch.no_grad():
        m.embed.weight.zero_()
        m.pos.table.zero_()
        m.pos.table[:, :n] = torch.eye(n)
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        attn.q_proj.weight[0:n - 1, 1:n] = sharp * torch.eye(n - 1)  # q_i = sharp·e_{i−1}
        attn.k_proj.weight[:n, :n] = torch.eye(n)
    return m


def test_a_head_forced_onto_the_previous_token_scores_one():
    m = _prev_token_lm()
    idx = torch.randint(0, 8, (3, 16), generator=torch.Generator().manual_seed(1))
    maps = attention_maps(m, idx)
    rows = head_scores(maps, idx)
    assert rows[0]["prev_token"] == pytest.approx(1.0, abs=1e-4)
    # Head 1 is uniform over the i+1 visible keys: prev score mean_i 1/(i+1), entropy mean_i log(i+1).
    assert rows[1]["prev_token"] == pytest.approx(sum(1 / (i + 1) for i in range(1, 16)) / 15, abs=1e-5)
    assert rows[1]["entropy"] == pytest.approx(sum(math.log(i + 1) for i in range(16)) / 16, abs=1e-5)
    assert rows[0]["entropy"] < 1e-2


def test_maps_times_values_are_the_kernel_output():
    torch.manual_seed(0)
    m = LM(LMConfig(vocab_size=11, n_layer=2, n_head=2, n_kv_head=1, d_model=16, max_seq_len=12)).eval()
    idx = torch.randint(0, 11, (2, 12))
    seen = []
    for layer in attention_layers(m):
        layer.kernel.register_forward_hook(lambda mod, args, kw, out: seen.append((args, kw, out)), with_kwargs=True)
    maps = attention_maps(m, idx)
    for p, (args, kw, out) in zip(maps, seen[-2:]):
        v = args[2].repeat_interleave(2, dim=1)
        torch.testing.assert_close(p @ v, out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, exact_attention(*args, causal=True), rtol=1e-5, atol=1e-5)
        assert torch.allclose(p.sum(-1), torch.ones(())) and (p.triu(1) == 0).all()


def test_induction_targets_and_a_perfect_induction_map():
    idx = torch.tensor([[5, 1, 2, 5, 2, 5]])
    assert induction_targets(idx).tolist() == [[-1, -1, -1, 1, 3, 4]]
    rep = repeated_random_tokens(50, 6, 4, seed=0)
    assert torch.equal(rep[:, :6], rep[:, 6:])
    tgt = induction_targets(rep)
    p = torch.zeros(4, 1, 12, 12)
    for b in range(4):
        for i in range(12):
            p[b, 0, i, max(tgt[b, i], 0)] = 1.0
    row = head_scores([p], rep)[0]
    assert row["induction"] == pytest.approx(1.0)


def _save(model, tmp_path):
    from dataclasses import asdict

    from attnlab.training.checkpoint import save_checkpoint

    record = {"run": {"task": "lm", "model": asdict(model.cfg), "data": {"source": "induction"}}}
    save_checkpoint(tmp_path / "run", 1, model, record)
    return tmp_path / "run"


def test_inspect_names_the_previous_token_head_and_writes_legible_maps(tmp_path, capsys):
    run = _save(_prev_token_lm(), tmp_path)
    out = tmp_path / "insp"
    assert main(["inspect", "--ckpt", str(run), "--out", str(out), "--batch", "2", "--text", "1 2 3 4 1 2 3 4"]) == 0
    report = (out / "report.md").read_text()
    assert "**Previous-token heads** (previous-token score ≥ 0.4): layer 0 head 0\n" in report
    assert (out / "attention_layer0.png").stat().st_size > 5000
    rows = (out / "stats.csv").read_text().splitlines()
    assert rows[0].startswith("layer,head,entropy,prev_token,induction") and len(rows) == 3
    capsys.readouterr()
    assert main(["inspect", "--ckpt", str(run), "--out", str(out), "--heads", "1", "--batch", "1"]) == 0
    assert "none" in (out / "report.md").read_text().split("Induction heads")[0]


@pytest.mark.parametrize("argv,words", [
    (["--ckpt", "MISSING"], "not found"),
    (["--text", " ".join(["1"] * 17)], "longer than the model's context"),
    (["--layers", "1"], "model has 1"),
    (["--heads", "2"], "model has 2"),
    (["--heads", "x"], "bad head selection"),
    (["--text", "9"], "0..7"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, words):
    run = _save(_prev_token_lm(), tmp_path)
    argv = [str(tmp_path / "nope") if a == "MISSING" else a for a in argv]
    if "--ckpt" not in argv:
        argv = ["--ckpt", str(run), *argv]
    assert main(["inspect", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err, err
