"""The `train`, `eval` and `generate` commands as Python functions, with their typed configs."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .config import from_dict
from .data.text import read_text
from .errors import UserError, require_file
from .models.lm import LM, LMConfig
from .training import OptimConfig, TrainConfig, train
from .training.checkpoint import load_weights, read_config, resolve_checkpoint
from .training.device import autocast, resolve_device
from .tasks import SyntheticConfig, SyntheticTask, TextLMTask


@dataclass
class DataConfig:
    source: Literal["text", "induction", "mqar"] = "text"
    path: str = ""  # a text file or a folder of text files (source=text)
    tokenizer: Literal["byte", "char", "bpe"] = "byte"
    bpe_vocab_size: int = 1024
    val_fraction: float = 0.1
    eval_batches: int = 20
    num_kv_pairs: int = 16  # mqar


@dataclass
class TrainRunConfig:
    out: str = "runs/train"
    model: LMConfig = field(default_factory=LMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def _tokenizer_for(data: DataConfig, out: Path | None, fresh: bool):
    """The run's tokenizer: trained/built on first use and saved in OUT/tokenizer, reloaded afterwards."""
    from .data.tokenizers import build_tokenizer, load_tokenizer

    tok_dir = out / "tokenizer" if out is not None else None
    if not fresh and tok_dir is not None and tok_dir.is_dir():
        return load_tokenizer(tok_dir)
    text = None
    if data.tokenizer != "byte":
        text = read_text(data.path)
    tok = build_tokenizer(data.tokenizer, text, vocab_size=data.bpe_vocab_size)
    if tok_dir is not None:
        tok.save(tok_dir)
    return tok


def build_task(data: DataConfig, model_cfg: LMConfig, batch_size: int, seed: int, tokenizer=None, seq_len=None):
    seq_len = seq_len or model_cfg.max_seq_len
    if data.source == "text":
        from .data.text import TextCorpus

        if not data.path:
            raise UserError("data.path is required for source=text (a text file or folder)")
        corpus = TextCorpus(data.path, tokenizer, val_fraction=data.val_fraction)
        return TextLMTask(corpus, seq_len, batch_size, seed=seed, eval_batches=data.eval_batches)
    syn = SyntheticConfig(kind=data.source, vocab_size=model_cfg.vocab_size, seq_len=seq_len,
                          num_kv_pairs=data.num_kv_pairs, eval_batches=data.eval_batches)
    return SyntheticTask(syn, batch_size, seed=seed)


def run_train(cfg: TrainRunConfig):
    out = Path(cfg.out)
    if out.exists() and (out / "checkpoints").exists() and not cfg.train.resume:
        raise UserError(f"{out} already holds a run; pass --train.resume true to continue it, or choose another --out")
    model_cfg = cfg.model
    tok = None
    if cfg.data.source == "text":
        require_file(cfg.data.path, "data")
        tok = _tokenizer_for(cfg.data, out, fresh=not cfg.train.resume)
        model_cfg.vocab_size = tok.vocab_size
    model = LM(model_cfg)
    task = build_task(cfg.data, model_cfg, cfg.train.batch_size, cfg.train.seed, tok)
    print(f"model: {model.num_params():,} parameters (non-embedding), "
          f"{model.flops_per_token() / 1e6:.2f} MFLOPs/token for training")
    res = train(model, task, cfg.train, cfg.optim, out_dir=out, run_config={"model": asdict(model_cfg), "data": asdict(cfg.data)})
    summary = {"steps": res.steps, "tokens_per_s": res.tokens_per_s, "step_s": res.step_s, **res.final}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


def load_lm(ckpt_path) -> tuple[LM, dict, Path]:
    """Rebuild the LM of a checkpoint (folder of a run or of one checkpoint) and load its weights."""
    ckpt = resolve_checkpoint(ckpt_path)
    record = read_config(ckpt)
    model = LM(from_dict(LMConfig, record.get("run", {}).get("model"), "checkpoint model config"))
    load_weights(model, ckpt)
    return model, record, ckpt


def _run_dir(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt


@dataclass
class EvalConfig:
    ckpt: str = ""  # a run folder or a checkpoint folder
    data: str = ""  # override the text the model was trained on
    context: int = 0  # 0: the model's max_seq_len
    batch_size: int = 8
    batches: int = 50
    split: Literal["val", "train"] = "val"
    mode: Literal["auto", "dense", "sample"] = "auto"  # attention mode; sample = stochastic kernels stay on
    ensemble: int = 1  # >1: average probabilities over this many stochastic passes (self-ensemble)
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0


def run_eval(cfg: EvalConfig) -> dict:
    from .attention import set_attention_mode

    if not cfg.ckpt:
        raise UserError("--ckpt is required")
    model, record, ckpt = load_lm(cfg.ckpt)
    device, amp = resolve_device(cfg.device, cfg.dtype)
    model.to(device).eval()
    set_attention_mode(model, "sample" if cfg.ensemble > 1 and cfg.mode == "auto" else cfg.mode)
    data = from_dict(DataConfig, record.get("run", {}).get("data"), "checkpoint data config")
    if cfg.data:
        data.path = cfg.data
    context = cfg.context or model.cfg.max_seq_len
    if context > model.cfg.max_seq_len:
        raise UserError(f"--context {context} is longer than the model's max_seq_len={model.cfg.max_seq_len}")
    tok = _tokenizer_for(data, _run_dir(ckpt), fresh=False) if data.source == "text" else None
    task = build_task(data, model.cfg, cfg.batch_size, cfg.seed, tok, seq_len=context)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(device, amp):
        metrics = _evaluate(model, task, data, cfg, device)
    metrics["eval_s"] = time.perf_counter() - t0
    result = {"ckpt": str(ckpt), "mode": cfg.mode, "ensemble": cfg.ensemble, "context": context, **metrics}
    print(json.dumps(result, indent=2))
    return result


def _evaluate(model, task, data: DataConfig, cfg: EvalConfig, device) -> dict:
    if cfg.ensemble <= 1:
        if data.source == "text":
            total = count = 0.0
            for b in task.eval_batches(cfg.split, cfg.batches):
                x, y = b["x"], b["y"]
                _, loss = model(x.to(device), y.to(device))
                total += loss.item() * x.numel()
                count += x.numel()
            if not count:
                raise UserError("no evaluation windows: the split is shorter than the context")
            return {"loss": total / count, "ppl": math.exp(min(total / count, 50)), "tokens": int(count)}
        return task.evaluate(model, device)
    from .inference.ensemble import ensemble_lm_metrics

    return ensemble_lm_metrics(model, task, k=cfg.ensemble, split=cfg.split, batches=cfg.batches, device=device)


@dataclass
class GenerateConfig:
    ckpt: str = ""
    prompt: str = ""
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, each one token of the tokenizer
    num_samples: int = 1
    sliding_window: bool = True  # keep generating past the context by conditioning on the latest tokens
    seed: int = 0
    device: str = "auto"


def run_generate(cfg: GenerateConfig) -> list[str]:
    from .inference.generate import generate

    if not cfg.ckpt:
        raise UserError("--ckpt is required")
    model, record, ckpt = load_lm(cfg.ckpt)
    device, _ = resolve_device(cfg.device, "float32")
    model.to(device).eval()
    data = from_dict(DataConfig, record.get("run", {}).get("data"), "checkpoint data config")
    if data.source != "text":
        raise UserError("generate needs a model trained on text")
    tok = _tokenizer_for(data, _run_dir(ckpt), fresh=False)
    ids = tok.encode(cfg.prompt) or [0]
    stops = []
    for s in cfg.stop:
        enc = tok.encode(s)
        if len(enc) != 1:
            raise UserError(f"stop string {s!r} is {len(enc)} tokens; it must be exactly one")
        stops.append(enc[0])
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    prompt = torch.tensor([ids] * cfg.num_samples, device=device)
    out = generate(model, prompt, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   stop_tokens=tuple(stops), generator=g, sliding_window=cfg.sliding_window)
    texts = [tok.decode(row.tolist()) for row in out]
    for t in texts:
        print(t)
        print("-" * 40)
    return texts
