"""A transformers causal LM as the teacher of `attnlab distill`: a tiny random Llama saved offline (directory and
GGUF), a 1-layer attnlab student moving towards it (KL measured independently in float64), the student's
run evaluating and generating with the teacher's tokenizer, and the refusals."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attnlab.cli import main
from attnlab.data.tokenizers import PretrainedTokenizer, load_tokenizer
from attnlab.integrations.hf_eval import byte_level_tokenizer
from attnlab.integrations.tiny_llama import write_gguf
from attnlab.run.build import build_model
from attnlab.run.load import load_run

TEXT = "the theatre then, the thespian thinks: to be, or not to be, that is the question.\n" * 20
STUDENT = ["--model.n_layer", "1", "--model.n_head", "2", "--model.d_model", "32", "--model.max_seq_len", "32",
           "--train.batch_size", "4", "--train.eval_every", "0", "--train.progress", "false",
           "--train.tensorboard", "false", "--data.eval_batches", "2"]


def tiny_llama(vocab=256, seed=0):
    torch.manual_seed(seed)
    # A wide initialisation gives a peaked, context-dependent distribution, something to learn from.
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, initializer_range=0.3, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_teacher")
    model = tiny_llama()
    model.save_pretrained(root / "teacher")
    byte_level_tokenizer().save_pretrained(root / "teacher")
    small = tiny_llama(vocab=200)  # fewer output tokens than its byte tokenizer has ids
    small.save_pretrained(root / "narrow")
    byte_level_tokenizer().save_pretrained(root / "narrow")
    write_gguf(tiny_llama(vocab=258, seed=1), root / "teacher.gguf")  # the bytes plus the merges "th", "the"
    (root / "text.txt").write_text(TEXT)
    return root, model


def _kl(teacher_logits, student_logits):
    """Mean over positions of Σ p log(p/q) at T = 1, in float64."""
    p = torch.softmax(teacher_logits.double(), -1)
    return float((p * (p.log() - torch.log_softmax(student_logits.double(), -1))).sum(-1).mean())


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnlab: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_a_student_moves_towards_a_transformers_teacher_and_is_an_ordinary_run(files, tmp_path, capsys):
    root, teacher = files
    out = tmp_path / "student"
    assert main(["distill", "--teacher_hf", str(root / "teacher"), "--data.path", str(root / "text.txt"),
                 "--out", str(out), "--alpha", "1", "--temperature", "1", "--train.steps", "20",
                 "--optim.lr", "1e-2", "--optim.warmup_steps", "2", *STUDENT]) == 0
    run = load_run(out)
    record = run.record["run"]
    assert record["data"]["tokenizer"] == "hf" and record["distill"]["teacher_kind"] == "transformers"
    tok = load_tokenizer(out / "tokenizer")
    assert tok.kind == "hf" and run.model.cfg.vocab_size == 256
    assert tok.encode(TEXT[:200]) == byte_level_tokenizer()(TEXT[:200], add_special_tokens=False)["input_ids"]

    ids = torch.tensor(tok.encode(TEXT[: 4 * 32])).view(4, 32)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
        before = _kl(t_logits, build_model(run.model.cfg, seed=1337)(ids))  # the trainer's initial weights
        after = _kl(t_logits, run.model.eval()(ids))
    assert before > 0.5 and after < 0.75 * before, (before, after)

    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out), "--batches", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] > 0
    assert main(["generate", "--ckpt", str(out), "--prompt", "the ", "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the ")


def test_a_gguf_teacher_gives_the_student_its_tokenizer_and_fills_the_top_k_cache(files, tmp_path):
    root, _ = files
    out = tmp_path / "student"
    assert main(["distill", "--teacher_gguf_file", str(root / "teacher.gguf"), "--data.path", str(root / "text.txt"),
                 "--out", str(out), "--top_k", "4", "--teacher_cache", str(tmp_path / "cache"),
                 "--train.steps", "2", *STUDENT]) == 0
    tok = load_tokenizer(out / "tokenizer")
    assert tok.vocab_size == 258 and load_run(out).model.cfg.vocab_size == 258
    assert tok.encode("the thin") == [257, ord(" "), 256, ord("i"), ord("n")]  # the file's merges
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_a_padded_output_layer_sizes_the_tokenizer_and_survives_a_round_trip(tmp_path):
    backend = byte_level_tokenizer().backend_tokenizer
    tok = PretrainedTokenizer(backend, 260)
    again = load_tokenizer(tok.save(tmp_path / "tok"))
    assert isinstance(again, PretrainedTokenizer) and again.vocab_size == 260 and again.name == tok.name
    assert again.decode(again.encode("to be, é")) == "to be, é"
    assert PretrainedTokenizer(backend).vocab_size == 256


def test_bad_teachers_are_one_line_and_a_larger_student_is_noted(files, tmp_path, capsys):
    root, _ = files
    text = ["--data.path", str(root / "text.txt")]
    hf = ["--teacher_hf", str(root / "teacher")]
    cases = [
        ([*hf, "--teacher", str(root), *text], "give one teacher"),
        (["--teacher_hf", str(root / "narrow"), *text], "vocabulary"),
        ([*hf, *text, "--data.tokenizer", "char"], "teacher's tokenizer"),
        (hf, "--data.path"),
        (["--teacher_hf", str(root / "missing"), *text], "not found"),
    ]
    for args, words in cases:
        assert main(["distill", "--out", str(tmp_path / "x"), *args, *STUDENT]) == 2, args
        assert words in _err(capsys)
        assert not (tmp_path / "x").exists()
    assert main(["distill", "--out", str(tmp_path / "big"), *hf, *text, "--train.steps", "1",
                 *STUDENT, "--model.d_model", "96", "--model.n_layer", "2"]) == 0
    err = capsys.readouterr().err
    assert "larger than its teacher" in err and len(err.strip().splitlines()) == 1
