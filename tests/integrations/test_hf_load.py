"""Loading pretrained models offline: transformers directories and GGUF files (a tiny one written here with
the gguf package's writer, in llama.cpp's layout), and the refusals of bad sources and unpatchable models."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from attnlab.cli import main
from attnlab.errors import UserError
from attnlab.integrations.hf import patch_model, unpatchable_layers
from attnlab.integrations.hf_eval import HFEvalConfig, byte_level_tokenizer, hf_eval
from attnlab.integrations.hf_load import load_pretrained, resolve_source
from attnlab.integrations.tiny_llama import write_gguf

TEXT = "the theatre then, the thespian thinks: to be, or not to be, that is the question.\n" * 8


def tiny_llama(vocab=258):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, rope_theta=10000.0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_load")
    model = tiny_llama()
    write_gguf(model, root / "tiny.gguf")
    model.save_pretrained(root / "dir")
    byte_level_tokenizer().save_pretrained(root / "dir")
    (root / "text.txt").write_text(TEXT)
    (root / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf at all")
    (root / "empty").mkdir()
    return root, model


def test_gguf_round_trip_gives_the_same_model_and_its_tokenizer(saved):
    root, ref = saved
    for args in ((root / "tiny.gguf", None), (None, root / "tiny.gguf"), (root, "tiny.gguf")):
        tok, model = load_pretrained(*args)
        assert type(model) is LlamaForCausalLM and model.config.num_key_value_heads == 2
        x = torch.randint(0, 258, (2, 40), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=1e-6)
    # The vocabulary and merges came from the file's metadata: "th" and "the" are single tokens.
    ids = tok("the thin", add_special_tokens=False)["input_ids"]
    assert ids == [257, ord(" "), 256, ord("i"), ord("n")]


def test_a_gguf_loaded_model_saves_and_reloads_with_plain_transformers(saved, tmp_path):
    root, ref = saved
    _, model = load_pretrained(gguf_file=root / "tiny.gguf")
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, 258, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, ref(x).logits, rtol=0, atol=1e-6)


def test_hf_eval_scores_a_gguf_file_like_its_source_model(saved):
    root, ref = saved
    r = hf_eval(HFEvalConfig(gguf_file=str(root / "tiny.gguf"), data=str(root / "text.txt"), attention="exact",
                             context=64, windows=2, device="cpu", layers="last:2"))
    assert math.isclose(r["patched"]["nll"], r["unpatched"]["nll"], rel_tol=1e-6)
    tok, _ = load_pretrained(gguf_file=root / "tiny.gguf")
    ids = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"][: 2 * 64]).view(2, 64)
    with torch.no_grad():
        loss = ref(ids, labels=ids).loss.item()
    assert math.isclose(r["unpatched"]["nll"], loss, rel_tol=1e-5)


@pytest.mark.parametrize("model, gguf, words", [
    ("fake.gguf", None, "is not a GGUF file"),
    (None, "fake.gguf", "is not a GGUF file"),
    (None, "missing.gguf", "GGUF file not found"),
    ("empty", None, "has no config.json"),
    ("nowhere", None, "model directory not found"),
    (None, None, "no model given"),
])
def test_bad_sources_are_one_line_errors(saved, model, gguf, words):
    root, _ = saved
    with pytest.raises(UserError, match=words):
        resolve_source(model and root / model, gguf and root / gguf)


def test_cli_refuses_bad_sources_with_exit_2(saved, capsys):
    root, _ = saved
    common = ["--data", str(root / "text.txt"), "--context", "64", "--windows", "1"]
    for argv, words in ((["--gguf_file", str(root / "fake.gguf")], "is not a GGUF file"),
                        (["--model", str(root / "empty")], "has no config.json")):
        assert main(["hf-eval", *argv, *common]) == 2
        err = capsys.readouterr().err.strip()
        last = err.splitlines()[-1]  # above it at most transformers' loading bars
        assert last.startswith("attnlab: error:") and words in last and "Traceback" not in err, err
    assert main(["hf-eval", "--gguf_file", str(root / "tiny.gguf"), *common, "--attention", "exact"]) == 0


def test_unpatchable_layers_are_named_with_the_reason():
    cfg = Gemma2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                       attn_logit_softcapping=50.0)
    model = Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager")
    assert unpatchable_layers(model) == {"attention logit soft-capping (attn_logit_softcapping=50.0)": [0, 1, 2]}
    with pytest.raises(UserError, match=r"layers 1-2: attention logit soft-capping"):
        patch_model(model, "hyper", layers="last:2")
    assert model.config._attn_implementation == "eager"  # left as it was
    assert unpatchable_layers(tiny_llama()) == {}
