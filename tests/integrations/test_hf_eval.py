"""hf-eval on a tiny byte-level Llama saved to a temporary directory."""

import json
import math

import pytest
import torch

# transformers is the optional extra attnlab[hf]; `make test` and CI install it, so it is imported, not skipped.
from transformers import LlamaConfig, LlamaForCausalLM

from attnlab.errors import UserError
from attnlab.integrations.hf_eval import HFEvalConfig, byte_level_tokenizer, hf_eval, token_windows

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n" * 12


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_eval")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "model")
    byte_level_tokenizer().save_pretrained(root / "model")
    (root / "text.txt").write_text(TEXT)
    return root


def run(saved, **kw):
    base = dict(model=str(saved / "model"), data=str(saved / "text.txt"), attention="exact", context=64,
                windows=3, device="cpu")
    return hf_eval(HFEvalConfig(**{**base, **kw}))


def test_byte_tokenizer_ids_are_utf8_bytes():
    s = "Wherefore art thou, Roméo?\n"
    assert byte_level_tokenizer()(s, add_special_tokens=False)["input_ids"] == list(s.encode())


def test_exact_matches_unpatched_and_hf_loss(saved, capsys):
    out = saved / "res.json"
    r = run(saved, out=str(out), layers="last:2")
    assert r["patched_layers"] == [1, 2] and r["tokens_scored"] == 3 * 63
    assert math.isclose(r["patched"]["nll"], r["unpatched"]["nll"], rel_tol=1e-6)
    # The perplexity must be the e-based one of transformers' own loss on the same windows.
    model = LlamaForCausalLM.from_pretrained(saved / "model").eval()
    ids = torch.tensor(list(TEXT.encode())[: 3 * 64]).view(3, 64)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert math.isclose(r["unpatched"]["perplexity"], math.exp(loss), rel_tol=1e-5)
    saved_json = json.loads(out.read_text())
    assert saved_json["patched"]["perplexity"] == pytest.approx(r["patched"]["perplexity"])
    assert saved_json["config"]["layers"] == "last:2"
    table = capsys.readouterr().out
    assert "unpatched" in table and "perplexity (e)" in table


def test_ssa_self_ensemble_samples_and_costs_k_passes(saved):
    r = run(saved, attention="ssa", options={"factor": 4}, ensemble=3, windows=1)
    assert r["ensemble"] == 3
    assert not math.isclose(r["patched"]["nll"], r["unpatched"]["nll"], rel_tol=1e-4)
    assert r["patched"]["nll"] < math.log(256) + 1  # averaged probabilities of sub-models, not garbage


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(model="/nonexistent/model"), "model directory not found"),
        (dict(layers="middle"), "bad layer selection"),
        (dict(attention="flashy"), "unknown attention"),
        (dict(context=10_000), "fewer than one window"),
        (dict(ensemble=2), "stochastic"),
    ],
)
def test_bad_input_is_a_user_error(saved, kw, message):
    with pytest.raises(UserError, match=message):
        run(saved, **kw)


def test_windows_are_non_overlapping_and_counted(saved):
    tok = byte_level_tokenizer()
    w = token_windows(tok, saved / "text.txt", 100, 0)
    assert w.shape == (len(TEXT.encode()) // 100, 100)
    assert w[1, 0].item() == TEXT.encode()[100]


def test_cli_runs_hf_eval_and_turns_bad_input_into_exit_2(saved, capsys):
    from attnlab.cli import main

    out = saved / "cli.json"
    rc = main(["hf-eval", "--model", str(saved / "model"), "--data", str(saved / "text.txt"), "--attention", "hyper",
               "--options", '{"min_seq_len": 16, "block_size": 8, "sample_size": 8, "prescore": "norm", "top_k": 8}',
               "--layers", "last:1", "--context", "64", "--windows", "2", "--out", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["options"]["prescore"] == "norm" and r["patched_layers"] == [2]
    assert r["patched"]["nll"] != r["unpatched"]["nll"]  # hyper is active at 64 tokens with min_seq_len 16
    assert main(["hf-eval", "--model", str(saved / "missing"), "--data", str(saved / "text.txt")]) == 2
    assert "model directory not found" in capsys.readouterr().err
