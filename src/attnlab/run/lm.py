"""The language-model kind: a decoder LM on a text corpus or a synthetic recall task."""

from __future__ import annotations

from dataclasses import replace

from ..config import from_dict
from ..errors import UserError
from ..inference.quantize import load_quantized_checkpoint
from ..models.lm import LM, LMConfig
from ..training.checkpoint import load_weights
from .build import build, build_task, tokenizer_for
from .config import DataConfig, RunConfig
from .evaluate import evaluate
from .kinds import Kind, register
from .load import LoadedRun


def load(record: dict, ckpt, run_dir) -> LoadedRun:
    run = record.get("run", {})
    model = LM(from_dict(LMConfig, run.get("model"), "checkpoint model config"))
    if record.get("quantized"):  # written by `attnlab quantize`: int8 tensors and the manifest of swapped layers
        load_quantized_checkpoint(model, ckpt, record["quantized"])
    else:
        load_weights(model, ckpt)
    data = from_dict(DataConfig, run.get("data"), "checkpoint data config")
    return LoadedRun(model, tokenizer_for(data, run_dir, fresh=False), data, record, ckpt, run_dir, "lm")


def lm_task(run: LoadedRun, *, batch_size: int, seed: int = 0, seq_len: int | None = None, data_path: str = ""):
    """The run's task (its validation data) at `seq_len` (default: the model's), optionally on other text."""
    data = replace(run.data, path=data_path) if data_path else run.data
    return build_task(data, run.model.cfg, batch_size, seed, run.tokenizer, seq_len=seq_len)


def evaluate_run(run: LoadedRun, cfg, device, amp) -> dict:
    if cfg.split == "test":
        raise UserError("a language-model run has no test split; use --split val or train")
    if cfg.tta != "none":
        raise UserError("--tta applies to image runs")
    model = run.model
    context = cfg.context or model.cfg.max_seq_len
    if context > model.cfg.max_seq_len:
        raise UserError(f"--context {context} is longer than the model's max_seq_len={model.cfg.max_seq_len}")
    task = lm_task(run, batch_size=cfg.batch_size, seed=cfg.seed, seq_len=context, data_path=cfg.data)
    split = "val" if cfg.split == "auto" else cfg.split
    metrics = evaluate(model, task, mode=cfg.mode, ensemble=cfg.ensemble, split=split, batches=cfg.batches,
                       device=device, amp=amp, seed=cfg.seed)
    if run.data.source == "text":
        metrics.pop("accuracy")  # next-token accuracy is not what a text run reports
    return {"context": context, **metrics}


register(Kind("lm", RunConfig, build, load, evaluate_run,
              "a decoder LM on a text corpus or a synthetic recall task (induction, mqar)"))
