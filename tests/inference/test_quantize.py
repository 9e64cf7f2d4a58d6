"""int8 quantisation: per-row weights against float64 math, each matmul route against the fp32 layer, whole LMs
of every mechanism (and KV shifting) against their fp32 selves, and the saved run through the CLI."""

import json

import pytest
import torch
from safetensors import safe_open

from attnlab.attention import AttentionSpec
from attnlab.attention.registry import kernels
from attnlab.cli import main
from attnlab.inference.quantize import (Int8Linear, load_quantized, quantize_model, quantize_rows, quantized_state,
                                        resolve_route)
from attnlab.models.lm import LM, LMConfig


def test_rows_round_to_the_nearest_step_of_their_own_scale():
    w = torch.randn(16, 40, dtype=torch.float64) * torch.logspace(-3, 1, 16, dtype=torch.float64)[:, None]
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    s64 = w.abs().amax(1) / 127
    assert torch.allclose(s.double(), s64, rtol=1e-6)
    err = (q.double() * s.double()[:, None] - w).abs()
    assert (err <= s64[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert (q.abs().amax(1) == 127).all()  # every row uses its full range


@pytest.mark.parametrize("route", ["fbgemm", "int_mm", "dequant"])
@pytest.mark.parametrize("scheme", ["dynamic", "weight-only"])
def test_int8_linear_is_close_to_the_fp32_layer(route, scheme):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    x = torch.randn(3, 5, 64)
    q = Int8Linear.from_linear(lin, scheme, route)
    if resolve_route(route, x.device) != route:
        pytest.fail(f"route {route} is not available on this CPU")
    ref = (x.double() @ lin.weight.double().t() + lin.bias.double())
    y = q(x)
    assert y.shape == (3, 5, 48) and y.dtype == torch.float32
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < (0.01 if scheme == "weight-only" else 0.03), rel
    if scheme == "weight-only":  # exact product with the dequantised weight
        deq = q.qweight.double() * q.scale.double()[:, None]
        assert torch.allclose(y.double(), x.double() @ deq.t() + lin.bias.double(), atol=1e-4)


def _lm(name="exact", transform="none", tie=True):
    torch.manual_seed(0)
    spec = AttentionSpec(name=name, transform=transform)
    return LM(LMConfig(vocab_size=61, n_layer=2, n_head=4, d_model=64, max_seq_len=64, tie_embeddings=tie,
                       attention=spec)).eval()


def _loss(model, idx, seed=0):
    torch.manual_seed(seed)  # stochastic mechanisms draw the same samples in both models
    with torch.no_grad():
        return model(idx[:, :-1], idx[:, 1:])[1].item()


@pytest.mark.parametrize("name", sorted(n for n, e in kernels().items() if e.caps.causal))  # an LM needs causal
@pytest.mark.parametrize("transform", ["none", "kv_shift"])
def test_every_mechanism_quantises_and_keeps_its_loss(name, transform):
    model = _lm(name, transform)
    # train nothing: a random model's loss is ~log V, so compare logits on a sequence it has seen as well
    idx = torch.randint(0, 61, (2, 64), generator=torch.Generator().manual_seed(1))
    fp32 = _loss(model, idx)
    with torch.no_grad():
        ref_logits = model(idx)
    manifest = quantize_model(model, "dynamic")
    assert len(manifest["linears"]) == 2 * 6 and manifest["tied"] == {"head": "embed"}
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert abs(_loss(model, idx) - fp32) / fp32 < 0.01
    if name == "exact":
        with torch.no_grad():
            logits = model(idx)
        assert (logits - ref_logits).abs().max() < 0.05 * ref_logits.abs().max()


@pytest.mark.parametrize("tie", [True, False])
def test_saved_tensors_rebuild_the_same_model(tie):
    model = _lm("exact", "kv_shift", tie=tie)
    cfg = model.cfg
    manifest = quantize_model(model, "weight-only")
    state = quantized_state(model)
    assert ("head.qweight" in state) != tie  # a tied head reads the embedding's table, stored once
    assert state["embed.qweight"].dtype == torch.int8
    again = load_quantized(LM(cfg).eval(), state, json.loads(json.dumps(manifest)))
    idx = torch.randint(0, 61, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(idx), again(idx))


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 80)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data.path", str(text), "--data.tokenizer", "char",
                 "--model.n_layer", "1", "--model.n_head", "2", "--model.d_model", "32", "--model.max_seq_len", "32",
                 "--model.attention.transform", "kv_shift", "--train.batch_size", "4", "--train.steps", "4",
                 "--train.eval_every", "0", "--train.progress", "false", "--data.eval_batches", "2"]) == 0
    return out


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnlab: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_quantised_run_evaluates_and_generates_through_the_cli(run, tmp_path, capsys):
    q = tmp_path / "q"
    assert main(["quantize", "--ckpt", str(run), "--out", str(q)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ratio"] < 0.5 and info["int8_bytes"] > 0
    ckpt = q / "checkpoints" / (q / "checkpoints" / "latest").read_text().strip()
    record = json.loads((ckpt / "config.json").read_text())
    assert record["quantized"]["scheme"] == "dynamic" and not (ckpt / "train_state.pt").exists()
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("blocks.0.mlp.up.qweight").dtype == torch.int8
    losses = []
    for path in (run, q):
        assert main(["eval", "--ckpt", str(path), "--batches", "2"]) == 0
        losses.append(json.loads(capsys.readouterr().out)["loss"])
    assert abs(losses[1] - losses[0]) / losses[0] < 0.01
    assert main(["generate", "--ckpt", str(q), "--prompt", "To be", "--max_new_tokens", "10", "--seed", "1"]) == 0
    sample = capsys.readouterr().out.splitlines()[0]
    assert sample.startswith("To be") and len(sample) == 15
    assert main(["quantize", "--ckpt", str(q), "--out", str(tmp_path / "qq")]) == 2
    assert "already quantised" in _err(capsys)


def test_quantize_refuses_a_missing_run_and_an_occupied_out(run, tmp_path, capsys):
    assert main(["quantize", "--ckpt", str(tmp_path / "nothing")]) == 2
    assert "not found" in _err(capsys)
    assert main(["quantize"]) == 2
    _err(capsys)
    assert main(["quantize", "--ckpt", str(run), "--out", str(run)]) == 2
    _err(capsys)
    assert main(["quantize", "--ckpt", str(run), "--scheme", "int4"]) == 2
    _err(capsys)


def test_a_manifest_from_before_ties_were_found_by_weight_still_loads():
    model = _lm("exact")
    manifest = quantize_model(model, "dynamic")
    old = {k: v for k, v in manifest.items() if k not in ("tied", "kept")} | {"tied_head": True}
    again = load_quantized(LM(model.cfg).eval(), quantized_state(model), old)
    idx = torch.randint(0, 61, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(idx), again(idx))
