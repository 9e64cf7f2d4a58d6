"""`attnlab bench quantize --model/--gguf_file --data`: the int8 path on a tiny saved Llama (a folder and the
same model as a GGUF file), its perplexity against an independent float64 computation, and bad sources."""

import csv
import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from attnlab.cli import main
from attnlab.integrations.hf_eval import byte_level_tokenizer
from attnlab.integrations.tiny_llama import write_gguf

TEXT = "the theatre then, the thespian thinks: to be, or not to be, that is the question.\n" * 12
CONTEXT, WINDOWS, GEN = 16, 2, 4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("qpre")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "dir")
    byte_level_tokenizer().save_pretrained(root / "dir")
    write_gguf(model, root / "tiny.gguf")
    (root / "text.txt").write_text(TEXT)
    (root / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf at all")
    return root, model


def _bench(out, *source, root):
    return main(["bench", "quantize", "--out", str(out), *source, "--data", str(root / "text.txt"), "--context",
                 str(CONTEXT), "--windows", str(WINDOWS), "--gen_tokens", str(GEN), "--rounds", "1"])


def _rows(out):
    with open(out / "quantize.csv") as f:
        return {r["variant"]: r for r in csv.DictReader(f)}


def _heldout_ppl(model, ids):
    """Perplexity of the last 10% of TEXT's ids, cut into windows the way the bench cuts it, in float64."""
    ids = torch.tensor(ids)
    held = ids[int(len(ids) * 0.9):]
    w = held[: WINDOWS * CONTEXT].view(WINDOWS, CONTEXT)
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=w).logits.double(), -1)
    return math.exp(-lp[:, :-1].gather(-1, w[:, 1:, None]).mean().item())


def test_the_int8_path_on_a_saved_llama_against_fp32(saved, tmp_path):
    root, model = saved
    assert _bench(tmp_path / "q", "--model", str(root / "dir"), root=root) == 0
    rows = _rows(tmp_path / "q")
    assert list(rows) == ["fp32", "dynamic-fbgemm", "dynamic-int_mm", "weight-only"]
    fp32 = rows["fp32"]
    assert float(fp32["ppl"]) == pytest.approx(_heldout_ppl(model, list(TEXT.encode())), rel=1e-5)
    for r in rows.values():
        assert float(r["eval_tok_s"]) > 0 and float(r["gen_tok_s"]) > 0 and 0 <= int(r["gen_agree"]) <= GEN
        assert float(r["eval_speedup"]) == pytest.approx(float(r["eval_tok_s"]) / float(fp32["eval_tok_s"]))
        assert abs(float(r["ppl_change"])) < 0.01  # int8 moves a random model's perplexity by well under 1%
        if r["variant"] != "fp32":  # int8 weights with one fp32 scale per row of 32, fp32 norms
            assert 0 < float(r["size_ratio"]) < 0.4
    assert "int8 against fp32 on a pretrained model" in (tmp_path / "q" / "report.md").read_text()
    assert not list((tmp_path / "q").glob("weights_*"))  # the weights written to be measured are gone


def test_a_gguf_file_measures_the_same_model(saved, tmp_path):
    root, model = saved
    assert _bench(tmp_path / "g", "--gguf_file", str(root / "tiny.gguf"), root=root) == 0
    rows = _rows(tmp_path / "g")
    tok = AutoTokenizer.from_pretrained(root, gguf_file="tiny.gguf")  # bytes plus the file's two merges
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert float(rows["fp32"]["ppl"]) == pytest.approx(_heldout_ppl(model, ids), rel=1e-4)
    assert "The GGUF file itself is" in (tmp_path / "g" / "report.md").read_text()


@pytest.mark.parametrize("args, words", [
    (["--gguf_file", "fake.gguf"], "is not a GGUF file"),
    (["--model", "missing"], "model directory not found"),
    (["--gguf_file", "missing.gguf"], "GGUF file not found"),
    (["--model", "dir", "--data", ""], "need --data"),
    (["--model", "dir", "--ckpt", "some-run"], "exclude each other"),
    (["--data", "text.txt"], "--data is for a pretrained model"),
    (["--model", "dir", "--data", "nothing.txt"], "data file not found"),
])
def test_bad_sources_are_one_line_errors(saved, tmp_path, capsys, args, words):
    root, _ = saved
    args = [str(root / a) if a.endswith((".gguf", ".txt")) or a in ("missing", "dir") else a for a in args]
    argv = ["bench", "quantize", "--out", str(tmp_path / "x"), *args]
    if "--data" not in args:
        argv += ["--data", str(root / "text.txt")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and words in err, err
