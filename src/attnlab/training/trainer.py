"""The training loop: batch -> forward -> loss -> backward -> clip -> step -> log -> evaluate -> checkpoint.

A *task* owns the data and the loss, so the same loop trains language models, translation models and
classifiers with any attention mechanism:

    class Task(Protocol):
        def batch(self, step: int, micro: int, rank: int, device) -> dict   # deterministic in its arguments
        def loss(self, model, batch) -> tuple[Tensor, int]                 # (mean loss, tokens it covers)
        def evaluate(self, model, device) -> dict[str, float]             # e.g. {"val_loss": ..., "accuracy": ...}

Because a batch depends only on (seed, step, micro, rank), and the checkpoint holds the model, optimizer
and RNG states, a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from ..attention import set_attention_mode
from ..errors import UserError
from . import distributed
from .checkpoint import list_checkpoints, load_train_state, load_weights, save_checkpoint
from .device import autocast, resolve_device
from .logging import MetricsLogger
from .schedules import lr_at


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    schedule: Literal["cosine", "inverse_sqrt", "constant"] = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 12
    grad_accum: int = 1
    eval_every: int = 250  # 0: only at the end
    log_every: int = 10
    save_every: int = 0  # 0: at each evaluation (when out_dir is set)
    keep_checkpoints: int = 3
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (autocast)
    early_stop_metric: str | None = None  # stop once this eval metric reaches early_stop_value
    early_stop_value: float | None = None
    early_stop_mode: Literal["max", "min"] = "max"
    dense_finetune_steps: int = 0  # switch every kernel to dense attention for the last N steps
    resume: bool = False
    progress: bool = True
    tensorboard: bool = True


class Task(Protocol):
    def batch(self, step: int, micro: int, rank: int, device) -> dict: ...
    def loss(self, model, batch) -> tuple[torch.Tensor, int]: ...
    def evaluate(self, model, device) -> dict[str, float]: ...


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)  # one row per logged step
    evals: list[dict] = field(default_factory=list)  # one row per evaluation
    final: dict = field(default_factory=dict)  # the last evaluation
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    step_s: float = 0.0  # mean seconds per optimizer step
    stopped_early: bool = False


def batch_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """A CPU generator determined by (seed, step, micro, rank): batches need no state to resume."""
    g = torch.Generator()
    g.manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 101 + rank)
    return g


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # No decay on norms, biases and the scalar gates of transforms: only matrices and embeddings shrink.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _reached(value: float, target: float, mode: str) -> bool:
    return value >= target if mode == "max" else value <= target


def train(model: torch.nn.Module, task: Task, cfg: TrainConfig, optim: OptimConfig = OptimConfig(),
          out_dir: Path | str | None = None, run_config: dict | None = None) -> TrainResult:
    """Train `model` on `task`. With out_dir: metrics, TensorBoard and checkpoints go there."""
    if cfg.steps < 1 or cfg.grad_accum < 1:
        raise UserError("steps and grad_accum must be at least 1")
    if cfg.early_stop_metric and cfg.early_stop_value is None:
        raise UserError("early_stop_metric needs early_stop_value")
    device, amp = resolve_device(cfg.device, cfg.dtype)
    dist_info = distributed.setup(device)
    device = distributed.device_for(device, dist_info)
    out = Path(out_dir) if out_dir is not None else None
    torch.manual_seed(cfg.seed + dist_info.rank)
    model.to(device)
    opt = make_optimizer(model, optim)
    start = 0
    if cfg.resume:
        ckpts = list_checkpoints(out) if out is not None else []
        if not ckpts:
            raise UserError(f"--resume: no checkpoint found in {out}/checkpoints")
        start = _restore(model, opt, ckpts[-1], device)
    wrapped = DDP(model) if dist_info.world > 1 else model
    logger = MetricsLogger(out if dist_info.main else None, tensorboard=cfg.tensorboard)
    run_record = dict(run_config or {})
    if is_dataclass(getattr(model, "cfg", None)):
        # Enough to rebuild the model from the checkpoint alone (`attnlab eval`, `generate`).
        run_record.setdefault("model", asdict(model.cfg))
    config_record = {"run": run_record, "train": asdict(cfg), "optim": asdict(optim)}
    result = TrainResult(steps=start)
    dense_from = cfg.steps - cfg.dense_finetune_steps if cfg.dense_finetune_steps > 0 else None
    tokens_seen, t_train = 0, 0.0
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and dist_info.main), unit="step",
               dynamic_ncols=True, leave=False)
    try:
        for step in range(start, cfg.steps):
            if dense_from is not None and step >= dense_from:
                set_attention_mode(model, "dense")
            lr = lr_at(step, schedule=optim.schedule, lr=optim.lr, min_lr=optim.min_lr,
                       warmup=optim.warmup_steps, total=cfg.steps)
            for g in opt.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            model.train()
            loss_sum, tokens = 0.0, 0
            for micro in range(cfg.grad_accum):
                batch = task.batch(step, micro, dist_info.rank, device)
                sync = micro == cfg.grad_accum - 1 or dist_info.world == 1
                ctx = wrapped.no_sync() if not sync else _null()
                with ctx:
                    with autocast(device, amp):
                        loss, n_tok = task.loss(wrapped, batch)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
                tokens += n_tok
            if not math.isfinite(loss_sum):
                raise UserError(f"loss became {loss_sum} at step {step}; lower the learning rate or check the data")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip if optim.grad_clip > 0 else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            t_train += dt
            tokens_seen += tokens * dist_info.world
            result.steps = step + 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                loss_avg = distributed.mean_across(loss_sum, dist_info, device)
                row = {"loss": loss_avg, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tokens_seen / max(t_train, 1e-9)}
                result.history.append({"step": step, **row})
                logger.log(step, {f"train/{k}": v for k, v in row.items()})
                bar.set_postfix(loss=f"{loss_avg:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            last = step == cfg.steps - 1
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
                metrics = _evaluate(model, task, device, amp, dist_info)
                result.evals.append({"step": step + 1, **metrics})
                result.final = metrics
                logger.log(step + 1, {f"eval/{k}": v for k, v in metrics.items()})
                if dist_info.main:
                    bar.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                stop = cfg.early_stop_metric is not None and _reached(
                    metrics.get(cfg.early_stop_metric, float("nan")), cfg.early_stop_value, cfg.early_stop_mode)
                if cfg.early_stop_metric is not None and cfg.early_stop_metric not in metrics:
                    raise UserError(f"early_stop_metric {cfg.early_stop_metric!r} is not among {', '.join(metrics)}")
                if out is not None and dist_info.main and cfg.save_every == 0:
                    _save(out, step + 1, model, opt, config_record, cfg.keep_checkpoints)
                if stop:
                    result.stopped_early = True
                    break
            if out is not None and dist_info.main and cfg.save_every and (step + 1) % cfg.save_every == 0:
                _save(out, step + 1, model, opt, config_record, cfg.keep_checkpoints)
    finally:
        bar.close()
        logger.close()
        if dense_from is not None:
            set_attention_mode(model, "auto")
    trained = result.steps - start
    result.wall_s = t_train
    result.step_s = t_train / max(trained, 1)
    result.tokens_per_s = tokens_seen / max(t_train, 1e-9)
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@torch.no_grad()
def _evaluate(model, task, device, amp, dist_info) -> dict:
    was = model.training
    model.eval()
    # Evaluation draws random numbers (stochastic kernels, sampled batches) without disturbing training's RNG.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with autocast(device, amp):
            metrics = task.evaluate(model, device)
    model.train(was)
    return {k: distributed.mean_across(float(v), dist_info, device) for k, v in metrics.items()}


def _save(out, step, model, opt, config_record, keep):
    state = {
        "step": step,
        "optimizer": opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    save_checkpoint(out, step, model, config_record, state, keep=keep)


def _restore(model, opt, ckpt, device) -> int:
    load_weights(model, ckpt)
    state = load_train_state(ckpt)
    try:
        opt.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise UserError(f"optimizer state in {ckpt} does not match the model: {e}") from None
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])
