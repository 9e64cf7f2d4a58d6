"""int8 on transformers causal LMs: a tiny random Llama built from its config, quantised like an attnlab LM:
logits against fp32, the tied head stored once, greedy `generate` against full forwards and against fp32,
rebuilding from plain tensors, and the modules that must stay in float."""

import json

import pytest
import torch
from torch import nn
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from attnlab.inference.quantize import (Int8Embedding, Int8Linear, TiedInt8Head, load_quantized, quantize_model,
                                        quantized_state)
from attnlab.training.checkpoint import read_safetensors, save_safetensors

V = 97


def tiny_llama(tie=True, dtype=torch.float32, init=0.02):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, initializer_range=init, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _logits(model, idx):
    with torch.no_grad():
        return model(input_ids=idx, use_cache=False).logits.double()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scheme, tol", [("dynamic", 0.05), ("weight-only", 0.03)])  # ~0.5% per matmul, 15 deep
@pytest.mark.parametrize("tie", [True, False])
def test_a_llama_quantises_and_keeps_its_logits(scheme, tol, tie):
    model = tiny_llama(tie)
    idx = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, idx)
    manifest = quantize_model(model, scheme)
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in model.modules())
    assert manifest["embeddings"] == ["model.embed_tokens"] and manifest["kept"] == {}
    assert len(manifest["linears"]) == 2 * 7 + (not tie)  # q k v o gate up down per layer (+ an untied head)
    assert manifest["tied"] == ({"lm_head": "model.embed_tokens"} if tie else {})
    assert isinstance(model.lm_head, TiedInt8Head if tie else Int8Linear)
    assert isinstance(model.get_input_embeddings(), Int8Embedding)
    state = quantized_state(model)
    assert any(k.startswith("lm_head.") for k in state) != tie  # a tied head reads the embedding's table
    assert state["model.embed_tokens.qweight"].dtype == torch.int8
    assert _rel(_logits(model, idx), ref) < tol


# fbgemm quantises a call's activations with one scale for the whole call, so a full forward and one cached
# step see different scales; the plain-torch routes quantise each token on its own and agree to rounding.
@pytest.mark.parametrize("scheme, route, cache_tol", [("dynamic", "fbgemm", 0.05), ("dynamic", "int_mm", 1e-5),
                                                      ("weight-only", "dequant", 1e-5)])
def test_int8_greedy_generate_agrees_with_full_forwards_and_with_fp32(scheme, route, cache_tol):
    fp32, int8 = tiny_llama(), tiny_llama()
    quantize_model(int8, scheme, route)
    prompt = torch.tensor([[5, 17, 42, 8]])
    steps = 6
    gen = GenerationConfig(max_new_tokens=steps, do_sample=False, pad_token_id=0, output_logits=True,
                           return_dict_in_generate=True)
    with torch.no_grad():
        out = int8.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=gen)
        ref = fp32.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=gen)
    seq = out.sequences
    assert seq.shape == (1, 4 + steps) and ((seq >= 0) & (seq < V)).all()
    # Each cached decoding step through the int8 modules gives the logits of a full int8 forward of its prefix.
    cached = torch.stack(out.logits, 1)[0].double()
    full = torch.stack([_logits(int8, seq[:, : 4 + i])[0, -1] for i in range(steps)])
    assert _rel(cached, full) <= cache_tol
    assert torch.equal(seq[0, 4:], cached.argmax(-1))
    assert torch.equal(seq, ref.sequences)
    # ...and not by luck: every fp32 step's top-two margin exceeds twice the int8 model's largest logit error.
    a = torch.stack(ref.logits, 1)[0].double()
    top2 = a.topk(2, dim=-1).values
    assert ((top2[:, 0] - top2[:, 1]) > 2 * (a - cached).abs().amax(-1)).all()


@pytest.mark.parametrize("tie", [True, False])
def test_a_quantised_llama_rebuilds_from_plain_tensors(tie, tmp_path):
    model = tiny_llama(tie)
    manifest = json.loads(json.dumps(quantize_model(model, "dynamic")))
    save_safetensors(quantized_state(model), tmp_path / "m.safetensors")
    tensors, _ = read_safetensors(tmp_path / "m.safetensors")
    again = load_quantized(LlamaForCausalLM(model.config).eval(), tensors, manifest)
    idx = torch.randint(0, V, (1, 16))
    assert torch.equal(_logits(again, idx), _logits(model, idx))


def test_a_bfloat16_model_stays_bfloat16():
    model = tiny_llama(dtype=torch.bfloat16)
    idx = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = _logits(model, idx)
    quantize_model(model, "weight-only")
    with torch.no_grad():
        logits = model(input_ids=idx).logits
    assert logits.dtype == torch.bfloat16
    assert _rel(logits.double(), ref) < 0.05


class ScaledEmbedding(nn.Embedding):
    """Like the scaled word embeddings of some transformers models: its forward does more than a lookup."""

    def forward(self, idx):
        return super().forward(idx) * 8.0


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.scaled = ScaledEmbedding(50, 16)
        self.normed = nn.Embedding(50, 16, max_norm=1.0)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.proj = nn.Linear(16, 16)

    def forward(self, idx):
        h = self.scaled(idx) + self.normed(idx)
        return self.proj(self.mha(h, h, h, need_weights=False)[0])


def test_modules_the_swap_would_break_stay_float():
    torch.manual_seed(0)
    model = Mixed().eval()
    idx = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        ref = model(idx).double()
    manifest = quantize_model(model, "dynamic")
    assert set(manifest["kept"]) == {"scaled", "normed", "mha.out_proj"}
    assert manifest["linears"] == ["proj"] and manifest["embeddings"] == []
    assert type(model.scaled) is ScaledEmbedding and type(model.mha.out_proj) is not Int8Linear
    assert isinstance(model.proj, Int8Linear)
    with torch.no_grad():
        assert _rel(model(idx).double(), ref) < 0.03
