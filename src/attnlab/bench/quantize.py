"""`attnlab bench quantize`: the int8 routes side by side against fp32 on one CPU thread: size on disk, eval
tokens/s (a full forward of a batch), generate tokens/s (greedy decoding with the KV cache, batch 1) and
validation loss.

Routes: fp32; dynamic int8 through fbgemm (torch.ops.quantized.linear_dynamic, prepacked from our int8
tensors); dynamic int8 through torch._int_mm (plain torch, no quantized ops: the route that outlives
torch.ao); weight-only int8 (dequantised per call); and torchao's int8 configs when torchao is installed.
All variants are copies of one model, timed in interleaved rounds so that load from other processes falls on
all alike. Without --ckpt the model is random and scored on random tokens: the loss then only shows that
int8 changes it little; give a trained run for a real validation loss. With --model / --gguf_file the same
int8 path runs on a pretrained transformers model instead (`bench/quantize_pretrained.py`).
"""

from __future__ import annotations

import copy
import importlib.util
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..inference.generate import generate
from ..inference.quantize import quantize_model, quantized_state, resolve_route
from ..models.lm import LM, LMConfig
from ..run.evaluate import evaluate
from ..run.experiment import ExperimentConfig, experiment
from ..training.checkpoint import _state_for_safetensors, save_safetensors
from .measure import interleaved


@dataclass
class QuantizeBenchConfig(ExperimentConfig):
    out: str = "runs/bench_quantize"
    """output folder (must not hold an earlier run)"""
    ckpt: str = ""
    """a trained language-model run to quantise (its validation text gives the loss); empty: a random model"""
    d_model: int = 256
    """width of the random model (without --ckpt)"""
    layers: int = 4
    """layers of the random model"""
    heads: int = 4
    """heads of the random model"""
    vocab: int = 256
    """vocabulary of the random model"""
    context: int = 256
    """tokens per window of the eval timing (and max_seq_len of the random model)"""
    batch: int = 8
    """windows per batch of the eval timing"""
    gen_tokens: int = 64
    """tokens generated per generate timing"""
    rounds: int = 5
    """timed rounds (each times every variant once)"""
    eval_batches: int = 8
    """validation batches for the loss"""
    threads: int = 1
    """torch CPU threads"""
    model: str = ""
    """a pretrained transformers causal LM to quantise instead: a local checkpoint folder, or the folder of
    --gguf_file (needs --data; fp32 against dynamic and weight-only int8)"""
    gguf_file: str = ""
    """a GGUF file holding the pretrained model (a path, or a file name inside --model)"""
    data: str = ""
    """text file for a pretrained model: its last 10% gives the perplexity and the eval timing"""
    windows: int = 2
    """held-out windows of --context tokens for a pretrained model's perplexity and eval timing"""

    def __post_init__(self):
        for name in ("d_model", "layers", "heads", "vocab", "context", "batch", "gen_tokens", "rounds",
                     "eval_batches", "threads", "windows"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.model or self.gguf_file:
            from .quantize_pretrained import check_source

            check_source(self)
        elif self.data:
            raise UserError("--data is for a pretrained model (--model or --gguf_file); an attnlab run (--ckpt) "
                            "brings its own validation text")


def _model_and_task(cfg: QuantizeBenchConfig):
    if cfg.ckpt:
        from ..run.lm import lm_task
        from ..run.load import load_run

        run = load_run(cfg.ckpt)
        if run.kind != "lm" or run.record.get("quantized"):
            raise UserError(f"--ckpt must be an fp32 language-model run; {run.ckpt} is not")
        return run.model.cpu().eval(), lm_task(run, batch_size=cfg.batch, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = LM(LMConfig(vocab_size=cfg.vocab, n_layer=cfg.layers, n_head=cfg.heads, d_model=cfg.d_model,
                        max_seq_len=cfg.context)).eval()
    return model, _RandomTokens(cfg)


class _RandomTokens:
    def __init__(self, cfg):
        g = torch.Generator().manual_seed(cfg.seed + 1)
        self.x = torch.randint(0, cfg.vocab, (cfg.eval_batches, cfg.batch, cfg.context + 1), generator=g)

    def eval_batches(self, split, batches):
        for b in self.x[:batches]:
            yield b[:, :-1], b[:, 1:]


def _torchao_variants(fp32) -> tuple[dict, str]:
    if importlib.util.find_spec("torchao") is None:
        return {}, "torchao is not installed: its int8 configs are not measured."
    out = {}
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
        for name, conf in (("torchao-dynamic", Int8DynamicActivationInt8WeightConfig()),
                           ("torchao-weight-only", Int8WeightOnlyConfig())):
            m = copy.deepcopy(fp32)
            quantize_(m, conf)
            out[name] = m
        return out, "torchao's int8 configs are measured as installed."
    except Exception as e:  # an optional third-party route: report why it is missing instead of failing
        return out, f"torchao could not quantise this model: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


# (variant, scheme, route): both dynamic routes, since fbgemm scales a call's activations by one number and
# int_mm each token by its own, which matters for the outlier activations of pretrained models.
ROUTES = (("dynamic-fbgemm", "dynamic", "fbgemm"), ("dynamic-int_mm", "dynamic", "int_mm"),
          ("weight-only", "weight-only", "dequant"))


def int8_variants(fp32) -> tuple[dict, dict]:
    """fp32 and a quantised copy per route: (name -> model, the modules int8 kept in float and why)."""
    out, kept = {"fp32": fp32}, {}
    for name, scheme, route in ROUTES:
        m = copy.deepcopy(fp32)
        kept = quantize_model(m, scheme, route)["kept"]
        out[name] = m
    return out, kept


def _variants(fp32) -> tuple[dict, list[str]]:
    variants, _ = int8_variants(fp32)
    ao, note = _torchao_variants(fp32)
    variants.update(ao)
    return variants, [note]


def weight_bytes(name: str, model, folder: Path) -> int:
    """Size of the model's weights written as safetensors (0: not plain tensors, as torchao's subclasses are);
    the file is deleted again, since a pretrained model's are large."""
    state = _state_for_safetensors(model) if name == "fp32" else quantized_state(model)
    with tempfile.TemporaryDirectory(dir=folder, prefix="weights_") as tmp:
        path = Path(tmp) / f"{name}.safetensors"
        try:
            save_safetensors(state, path)
        except Exception:  # torchao's tensor subclasses are not plain tensors; their size is then not measured
            return 0
        return path.stat().st_size


@experiment("quantize", QuantizeBenchConfig, kind="benchmark")
def quantize_bench(cfg: QuantizeBenchConfig, ctx) -> dict:
    """fp32 against the int8 routes on CPU: size, eval and generate tokens/s, validation loss"""
    torch.set_num_threads(cfg.threads)
    if cfg.model or cfg.gguf_file:
        from .quantize_pretrained import pretrained_bench

        return pretrained_bench(cfg, ctx)
    fp32, task = _model_and_task(cfg)
    if fp32.cfg.max_seq_len < cfg.context and not cfg.ckpt:
        raise UserError("context is longer than the model's max_seq_len")
    context = min(cfg.context, fp32.cfg.max_seq_len)
    variants, notes = _variants(fp32)
    dev = torch.device("cpu")
    print(f"CPU, {torch.get_num_threads()} thread(s), d {fp32.cfg.d_model}, {fp32.cfg.n_layer} layers; dynamic "
          f"route auto = {resolve_route('auto', dev)}; variants: {', '.join(variants)}")
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randint(0, fp32.cfg.vocab_size, (cfg.batch, context), generator=g)
    prompt = x[:1, :8]
    gen_tokens = min(cfg.gen_tokens, fp32.cfg.max_seq_len - prompt.shape[1])

    def fwd(m):
        return lambda: m(x)

    def gen(m):
        return lambda: generate(m, prompt, gen_tokens, temperature=0.0)

    with torch.inference_mode():
        t_eval = interleaved({k: fwd(m) for k, m in variants.items()}, cfg.rounds, dev, warmup=1, alternate=True)
        t_gen = interleaved({k: gen(m) for k, m in variants.items()}, cfg.rounds, dev, warmup=1, alternate=True)
    rows = []
    for name, m in variants.items():
        loss = evaluate(m, task, split="val", batches=cfg.eval_batches, device=dev, amp=None, seed=cfg.seed)["loss"]
        rows.append({"variant": name, "params": sum(t.numel() for t in _state_for_safetensors(m).values()),
                     "bytes": weight_bytes(name, m, ctx.out), "eval_tok_s": cfg.batch * context / statistics.median(t_eval[name]),
                     "gen_tok_s": gen_tokens / statistics.median(t_gen[name]), "val_loss": loss})
    base = rows[0]
    for r in rows:
        r["size_ratio"] = r["bytes"] / base["bytes"] if r["bytes"] else float("nan")
        r["eval_speedup"] = r["eval_tok_s"] / base["eval_tok_s"]
        r["gen_speedup"] = r["gen_tok_s"] / base["gen_tok_s"]
        r["loss_change"] = r["val_loss"] / base["val_loss"] - 1
        print(f"  {r['variant']:>20}: size ×{r['size_ratio']:.3f}, eval ×{r['eval_speedup']:.2f}, "
              f"generate ×{r['gen_speedup']:.2f}, loss {r['loss_change']:+.3%}")
    ctx.report.csv("quantize.csv", rows)
    r = ctx.report
    r.h("int8 routes against fp32 on CPU", 1)
    r.p(f"{'run ' + cfg.ckpt if cfg.ckpt else 'a random model on random tokens'}: d {fp32.cfg.d_model}, "
        f"{fp32.cfg.n_layer} layers, vocab {fp32.cfg.vocab_size}; {torch.get_num_threads()} thread(s), eval "
        f"{cfg.batch}×{context} tokens, generate {gen_tokens} tokens greedy at batch 1; medians of {cfg.rounds} "
        f"interleaved rounds (process CPU time). Ratios are against fp32. " + " ".join(notes))
    r.table(rows, fmt="{:.4g}")
    r.save()
    return {"rows": rows, "notes": notes}
