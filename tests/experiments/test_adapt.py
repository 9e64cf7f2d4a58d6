"""`attnlab run adapt --quick` on the tiny byte-level Llama: every variant measured, the bookkeeping right."""

import json
import math

import pytest
import torch

from attnlab.cli import main
from attnlab.integrations.hf import patch_model
from attnlab.integrations.hf_eval import byte_level_tokenizer
from attnlab.integrations.hf_finetune import heldout_nll, heldout_windows, token_split
from attnlab.integrations.hf_load import load_pretrained
from attnlab.integrations.tiny_llama import make_tiny_llama

TEXT = "".join(f"verse {i % 11}: shall I compare thee to a summer's day, thou art more lovely {i % 5}.\n"
               for i in range(120))


@pytest.mark.slow
def test_quick_adapt_measures_every_variant_against_plain_fine_tuning(tmp_path, capsys):
    (tmp_path / "text.txt").write_text(TEXT)
    make_tiny_llama(tmp_path / "text.txt", tmp_path / "model", layers=2, hidden=32, heads=4, kv_heads=2, steps=0,
                    log=lambda m: None)
    out = tmp_path / "adapt"
    assert main(["run", "adapt", "--quick", "--out", str(out), "--model", str(tmp_path / "model"),
                 "--data", str(tmp_path / "text.txt"), "--layers", "last:1", "--device", "cpu",
                 "--prescores", '["none", "leverage"]']) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["variant"]: r for r in summary["rows"]}
    assert set(rows) == {"hyper", "hyper+leverage", "hyper +kv_shift"}
    # E0 is the pretrained model's own held-out perplexity, recomputed here independently.
    _, model = load_pretrained(tmp_path / "model")
    _, val = token_split(byte_level_tokenizer(), tmp_path / "text.txt", 0.1, 128)
    held = heldout_windows(val, 256, 1)
    e0 = heldout_nll(model, held)["perplexity"]
    patch_model(model, "hyper", {"min_seq_len": 32, "block_size": 16, "sample_size": 16, "lsh_bits": 3,
                                 "top_k": 8, "prescore": "none"}, "last:1")
    p0 = heldout_nll(model, held)["perplexity"]
    for r in rows.values():
        assert r["E0"] == pytest.approx(e0, rel=1e-6)
        assert r["E1"] != pytest.approx(r["E0"], rel=1e-6)  # the plain fine-tune trained
        assert r["recovered"] == pytest.approx(1 - (r["Pm"] - r["E1"]) / (r["P0"] - r["E0"]))
        assert r["beyond"] == pytest.approx(r["recovered"] - r["recovered_plain"])
        assert all(math.isfinite(r[k]) for k in ("P0", "Pe", "Pm", "Em"))
    # KV shifting starts at identity: before fine-tuning it is plain hyper.
    assert rows["hyper"]["P0"] == pytest.approx(p0, rel=1e-6)
    assert rows["hyper +kv_shift"]["P0"] == rows["hyper"]["P0"]
    assert rows["hyper +kv_shift"]["Pm"] != rows["hyper"]["Pm"]
    # The mechanism was really in place while training: the first step's loss differs from plain fine-tuning's.
    trains = {t["variant"]: t for t in summary["train"]}
    for label in rows:
        assert trains[label]["loss_first"] != pytest.approx(trains["plain (no mechanism)"]["loss_first"], rel=1e-6)
    assert "| variant |" in (out / "report.md").read_text() and (out / "recovered.png").stat().st_size > 0


def test_options_that_leave_hyper_exact_in_training_are_refused(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT)
    assert main(["run", "adapt", "--out", str(tmp_path / "o"), "--model", str(tmp_path), "--data",
                 str(tmp_path / "t.txt"), "--train_context", "128", "--hyper", '{"min_seq_len": 4096}']) == 2
    assert "is exact at --train_context 128" in capsys.readouterr().err
    # Block, sample and pre-scored keys covering the largest rectangle (256 keys) make it exact too.
    assert main(["run", "adapt", "--out", str(tmp_path / "o2"), "--model", str(tmp_path), "--data",
                 str(tmp_path / "t.txt"), "--train_context", "512", "--prescores", '["kmeans"]', "--hyper",
                 '{"min_seq_len": 128, "block_size": 64, "sample_size": 128, "top_k": 64}']) == 2
    assert "a query of the largest 256-key rectangle sees 256 keys" in capsys.readouterr().err


def test_layer_tails_reproduce_full_patched_passes(tmp_path):
    from attnlab.integrations.hf_tail import boundary_states, nll, tail_logits
    from attnlab.integrations.hf import unpatch_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(
        LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256), attn_implementation="sdpa").eval()
    ids = torch.randint(0, 61, (1, 96), generator=torch.Generator().manual_seed(0))
    logits, seen, _ = boundary_states(model, ids, [1, 3])
    for first in (1, 3):
        patch_model(model, "hyper", {"min_seq_len": 16, "block_size": 8, "sample_size": 8, "prescore": "kmeans",
                                     "top_k": 8}, f"last:{4 - first}")
        with torch.no_grad():
            full = model(ids, use_cache=False).logits
        tail, _ = tail_logits(model, seen[first], first)
        unpatch_model(model)
        torch.testing.assert_close(tail, full, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(tail, logits, atol=1e-4)  # the patch did change something
        assert nll(tail, ids) > 0
