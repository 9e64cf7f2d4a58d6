"""`attnlab finetune` on the tiny byte-level Llama (`attnlab.integrations.tiny_llama`), full and LoRA."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from attnlab.cli import main
from attnlab.integrations.hf_eval import byte_level_tokenizer
from attnlab.integrations.hf_finetune import FinetuneConfig, finetune, load_finetuned
from attnlab.integrations.tiny_llama import make_tiny_llama, write_gguf

TEXT = "".join(f"line {i % 7}: to be or not to be, that is the question {i % 3}.\n" for i in range(200))
HYPER = {"min_seq_len": 16, "block_size": 8, "sample_size": 8, "lsh_bits": 3}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    (root / "text.txt").write_text(TEXT)
    make_tiny_llama(root / "text.txt", root / "model", layers=2, hidden=32, heads=4, kv_heads=2, steps=0,
                    log=lambda m: None)
    return root


def run(tiny, out, **kw):
    base = dict(model=str(tiny / "model"), data=str(tiny / "text.txt"), out=str(out), context=32, batch_size=2,
                steps=2, lr=1e-3, warmup=1, eval_windows=2, device="cpu", progress=False)
    return finetune(FinetuneConfig(**{**base, **kw}))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


X = torch.tensor([list(b"to be or not to be, that is the q")])


def test_lora_merges_into_the_targets_only_and_plain_transformers_loads_it(tiny, tmp_path):
    before = AutoModelForCausalLM.from_pretrained(tiny / "model").state_dict()
    r = run(tiny, tmp_path / "o", attention="exact", method="lora", lora_targets="q_proj,v_proj", lr=5e-3)
    # layers × rank × (q: 32 in + 32 out, v: 32 in + 2 kv heads × 8 out)
    assert r["params"]["trainable"] == 2 * 8 * ((32 + 32) + (32 + 16))
    assert (tmp_path / "o" / "model.safetensors").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "o")  # plain transformers: nothing attnlab inside
    assert again.config._attn_implementation == "sdpa"
    after = again.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".q_proj." in k or ".v_proj." in k for k in changed)
    info = json.loads((tmp_path / "o" / "attnlab.json").read_text())
    assert info["attention"] == "exact" and info["layers"] == [0, 1]
    _, restored, _ = load_finetuned(tmp_path / "o")
    torch.testing.assert_close(logits(restored, X), logits(again, X), rtol=1e-5, atol=1e-5)


def test_full_fine_tune_learns_the_text(tiny, tmp_path):
    r = run(tiny, tmp_path / "o", method="full", steps=25, lr=3e-3, warmup=2, save=False)
    assert r["params"]["trainable"] == r["params"]["total"]
    assert r["heldout_after"]["nll"] < r["heldout_before"]["nll"] - 1.0  # a random init learns a lot quickly
    t = r["train"]
    assert t["tokens"] == 25 * 2 * 32 and t["tokens_per_second"] > 0 and t["steps_done"] == 25


def test_checkpointing_gives_the_same_update_and_bf16_runs(tiny, tmp_path):
    a = run(tiny, tmp_path / "a", method="lora", attention="hyper", options=HYPER)
    b = run(tiny, tmp_path / "b", method="lora", attention="hyper", options=HYPER, gradient_checkpointing=True)
    assert a["train"]["losses"] == pytest.approx(b["train"]["losses"], rel=1e-5)
    sa = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    sb = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)
    c = run(tiny, tmp_path / "c", method="lora", bf16=True, save=False)
    assert c["train"]["loss_first"] == pytest.approx(a["train"]["loss_first"], rel=0.05)


def test_hyper_with_kv_shift_saves_and_restores_what_it_trained(tiny, tmp_path):
    r = run(tiny, tmp_path / "o", method="lora", attention="hyper", options={**HYPER, "prescore": "leverage",
                                                                            "top_k": 4}, transform="kv_shift")
    assert r["transform_layers"] == [0, 1]
    assert (tmp_path / "o" / "attnlab_transform.safetensors").is_file()
    # Identity at first: the "before" perplexity is hyper's on the unchanged model.
    assert r["heldout_before"]["perplexity"] > 1
    _, restored, info = load_finetuned(tmp_path / "o")
    assert info["transform"] == "kv_shift" and info["options"]["prescore"] == "leverage"
    coef = restored.model.layers[0].self_attn.attnlab_transform.alpha.detach()
    assert not torch.equal(coef, torch.tensor([[1.0, 0.0]] * 2))  # the shift was trained
    # Re-evaluating the saved model with what it ran with reproduces the recorded held-out perplexity.
    from attnlab.integrations.hf_finetune import heldout_nll, heldout_windows, token_split

    _, val = token_split(byte_level_tokenizer(), tiny / "text.txt", 0.1, 32)
    again = heldout_nll(restored, heldout_windows(val, 32, 2), 2)
    assert again["nll"] == pytest.approx(r["heldout_after"]["nll"], rel=1e-5)


def test_a_gguf_source_fine_tunes(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    write_gguf(LlamaForCausalLM(cfg), tmp_path / "m.gguf")
    (tmp_path / "t.txt").write_text(TEXT)
    r = finetune(FinetuneConfig(gguf_file=str(tmp_path / "m.gguf"), data=str(tmp_path / "t.txt"),
                                out=str(tmp_path / "o"), method="full", context=32, batch_size=1, steps=1,
                                eval_windows=0, progress=False, device="cpu"))
    assert r["train"]["steps_done"] == 1
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o").config.vocab_size == 258


def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys):
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf")
    (tmp_path / "noconfig").mkdir()
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM._from_config(
        Gemma2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, attn_logit_softcapping=30.0),
        attn_implementation="eager")
    gemma.save_pretrained(tmp_path / "gemma")
    byte_level_tokenizer().save_pretrained(tmp_path / "gemma")
    capsys.readouterr()
    common = ["--data", str(tiny / "text.txt"), "--out", str(tmp_path / "o"), "--steps", "1", "--context", "32",
              "--progress", "false"]
    cases = [
        (["--gguf_file", str(tmp_path / "fake.gguf")], "is not a GGUF file"),
        (["--model", str(tmp_path / "noconfig")], "has no config.json"),
        (["--model", str(tmp_path / "gemma"), "--attention", "hyper"], "layers 0-1: attention logit soft-capping"),
        (["--model", str(tiny / "model"), "--lora_targets", "q_proj,query"], "LoRA target modules not in"),
    ]
    for argv, words in cases:
        assert main(["finetune", *argv, *common]) == 2
        err = capsys.readouterr().err.strip()
        last = err.splitlines()[-1]  # above it at most transformers' loading bars
        assert last.startswith("attnlab: error:") and words in last and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_lora_layers_limit_the_adapters(tiny, tmp_path):
    before = AutoModelForCausalLM.from_pretrained(tiny / "model").state_dict()
    r = run(tiny, tmp_path / "o", method="lora", lora_layers="last:1", lr=5e-3, eval_windows=0)
    assert r["params"]["trainable"] == 8 * ((32 + 32) * 2 + (32 + 16) * 2)  # one layer: q, o and k, v
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "o").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed)
