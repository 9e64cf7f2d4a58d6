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
from tqdm.auto import tqdm

from ..attention import set_attention_mode
from ..checks import fraction, literals, non_negative, positive, require
from ..errors import UserError
from . import distributed
from .checkpoint import load_train_state, load_weights, read_config, save_checkpoint
from .device import autocast, resolve_device
from .logging import MetricsLogger
from .rundir import check_resume_config, open_run
from .schedules import lr_at


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-3
    """peak learning rate"""
    min_lr: float = 1e-4
    """learning rate at the end of the cosine decay"""
    schedule: Literal["cosine", "inverse_sqrt", "constant"] = "cosine"
    """learning-rate schedule after warm-up"""
    warmup_steps: int = 100
    """linear warm-up steps"""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices and embeddings only)"""
    beta1: float = 0.9
    """AdamW β1"""
    beta2: float = 0.95
    """AdamW β2"""
    eps: float = 1e-8
    """AdamW ε"""
    grad_clip: float = 1.0
    """clip the gradient norm to this (0: no clipping)"""

    def __post_init__(self):
        p = "optim"
        positive(self, p, "lr", "eps")
        non_negative(self, p, "min_lr", "warmup_steps", "weight_decay", "grad_clip")
        fraction(self, p, "beta1", "beta2")
        literals(self, p)
        if self.schedule == "cosine":  # the only schedule that reads min_lr; above lr it would climb
            require(self.min_lr <= self.lr, f"{p}.min_lr ({self.min_lr}) must not exceed {p}.lr ({self.lr})")


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    """How long and on what a run trains: steps, batches, evaluation, checkpoints, device."""

    steps: int = 2000
    """optimizer steps in all (a resumed run continues to this many)"""
    batch_size: int = 12
    """sequences (or examples) per micro-batch and process"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    eval_every: int = 250
    """steps between evaluations (0: only at the end)"""
    log_every: int = 10
    """steps between logged training rows"""
    save_every: int = 0
    """steps between checkpoints (0: at each evaluation); the last step is always saved"""
    keep_checkpoints: int = 3
    """how many of the newest checkpoints to keep (0: all)"""
    seed: int = 1337
    """seed of everything: initial weights, batches, dropout, stochastic attention"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N"""
    dtype: str = "auto"
    """autocast dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16 (with a gradient scaler)"""
    early_stop_metric: str | None = None
    """stop once this eval metric reaches early_stop_value"""
    early_stop_value: float | None = None
    """the value of early_stop_metric that ends training"""
    early_stop_mode: Literal["max", "min"] = "max"
    """max: stop once the metric is at least the value; min: at most"""
    dense_finetune_steps: int = 0
    """switch every kernel to dense attention for the last N steps"""
    resume: bool = False
    """continue the run in --out from its newest complete checkpoint"""
    resume_override: bool = False
    """resume even though settings that alter the trajectory changed"""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: replicate (DDP) or shard (FSDP2) the model"""
    progress: bool = True
    """show a progress bar with throughput and ETA"""
    tensorboard: bool = True
    """write TensorBoard events to OUT/tb beside metrics.jsonl"""

    def __post_init__(self):
        p = "train"
        positive(self, p, "steps", "batch_size", "grad_accum", "log_every")
        non_negative(self, p, "eval_every", "save_every", "keep_checkpoints", "dense_finetune_steps")
        require(self.dense_finetune_steps <= self.steps,
                f"{p}.dense_finetune_steps ({self.dense_finetune_steps}) must not exceed {p}.steps ({self.steps})")
        require(0 <= self.seed < 2 ** 32, f"{p}.seed must be in [0, 2^32), got {self.seed}")
        literals(self, p)
        require(self.dtype in DTYPES, f"{p}.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        require(_valid_device(self.device), f"{p}.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        require(not self.early_stop_metric or self.early_stop_value is not None,
                f"{p}.early_stop_metric needs {p}.early_stop_value")
        require(self.early_stop_value is None or bool(self.early_stop_metric),
                f"{p}.early_stop_value needs {p}.early_stop_metric (which metric to compare)")
        require(self.early_stop_value is None or math.isfinite(self.early_stop_value),
                f"{p}.early_stop_value must be a finite number, got {self.early_stop_value}")


def _valid_device(name: str) -> bool:
    if name == "auto":
        return True
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        return False
    return True


class Task(Protocol):
    def batch(self, step: int, micro: int, rank: int, device) -> dict: ...
    def loss(self, model, batch) -> tuple[torch.Tensor, int]: ...
    def evaluate(self, model, device) -> dict[str, float]: ...


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)
    """one row per logged step"""
    evals: list[dict] = field(default_factory=list)
    """one row per evaluation"""
    final: dict = field(default_factory=dict)
    """the last evaluation"""
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    step_s: float = 0.0
    """mean seconds per optimizer step"""
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
    """Train `model` on `task`. With out_dir: metrics, TensorBoard and checkpoints go there.

    A new run refuses an out_dir that already holds a run; with cfg.resume it continues from the newest
    complete checkpoint, refusing changed trajectory settings unless cfg.resume_override. Under torchrun
    with cfg.parallel == "fsdp" the model is sharded in place and stays so after the call.
    """
    known = getattr(task, "metrics", None)  # a task that names its metrics lets a bad name fail before any work
    if cfg.early_stop_metric and known is not None and cfg.early_stop_metric not in known:
        raise UserError(f"train.early_stop_metric {cfg.early_stop_metric!r} is not a metric of this task; "
                        f"choose one of {', '.join(known)}")
    device, amp = resolve_device(cfg.device, cfg.dtype)
    dist_info = distributed.setup(device)
    device = distributed.device_for(device, dist_info)
    out = Path(out_dir) if out_dir is not None else None
    if cfg.resume and out is None:
        raise UserError("train.resume needs an output folder to resume from")
    run_record = dict(run_config or {})
    if is_dataclass(getattr(model, "cfg", None)):
        # Enough to rebuild the model from the checkpoint alone (`attnlab eval`, `generate`).
        run_record.setdefault("model", asdict(model.cfg))
    config_record = {"run": run_record, "train": asdict(cfg), "optim": asdict(optim), "world": dist_info.world}
    ckpt = open_run(out, cfg.resume, dist_info.main) if out is not None else None
    state = None
    if ckpt is not None:
        check_resume_config(read_config(ckpt), config_record, cfg.resume_override)
        load_weights(model, ckpt)
        state = load_train_state(ckpt)
    torch.manual_seed(cfg.seed + dist_info.rank)
    model.to(device)
    wrapped = distributed.wrap(model, dist_info, cfg.parallel, device)
    opt = make_optimizer(model, optim)
    scaler = _scaler(amp, device, distributed.sharded(model))
    start, last_eval = 0, {}
    if state is not None:
        start, last_eval = _restore(model, opt, scaler, state, ckpt, device, dist_info, cfg)
        if start > cfg.steps:
            raise UserError(f"the checkpoint is at step {start}, past train.steps={cfg.steps}; "
                            f"raise train.steps to continue the run")
    logger = MetricsLogger(out if dist_info.main else None, tensorboard=cfg.tensorboard,
                           resume_step=start if state is not None else None,
                           keep_bytes=state.get("metrics_bytes") if state is not None else None)
    result = TrainResult(steps=start, final=dict(last_eval))
    if state is not None and _finished(cfg, start, last_eval):
        logger.close()
        result.stopped_early = start < cfg.steps or bool(state.get("stopped_early"))
        return result
    dense_from = cfg.steps - cfg.dense_finetune_steps if cfg.dense_finetune_steps > 0 else None
    tokens_seen, t_train = 0, 0.0
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and dist_info.main), unit="step",
               dynamic_ncols=True, leave=False)

    def save(step):
        _save(out, step, model, opt, scaler, config_record, cfg, device, dist_info, logger, result.final,
              result.stopped_early)

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
                with distributed.sync_grads(wrapped, micro == cfg.grad_accum - 1):
                    with autocast(device, amp):
                        loss, n_tok = task.loss(wrapped, batch)
                    scaled = loss / cfg.grad_accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_sum += loss.item() / cfg.grad_accum
                tokens += n_tok
            if not math.isfinite(loss_sum):
                raise UserError(f"loss became {loss_sum} at step {step}; lower the learning rate or check the data")
            if scaler is not None:
                scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip if optim.grad_clip > 0 else float("inf"))
            if scaler is not None:
                scaler.step(opt)  # skipped when the scaled gradients overflowed
                scaler.update()
            else:
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
                row = {"loss": loss_avg, "lr": lr, "grad_norm": distributed.to_float(grad_norm),
                       "tokens_per_s": tokens_seen / max(t_train, 1e-9)}
                result.history.append({"step": step, **row})
                logger.log(step, {f"train/{k}": v for k, v in row.items()})
                bar.set_postfix(loss=f"{loss_avg:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            last = step == cfg.steps - 1
            evaluated = False
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
                evaluated = True
                metrics = _evaluate(model, task, device, amp, dist_info)
                result.evals.append({"step": step + 1, **metrics})
                result.final = metrics
                logger.log(step + 1, {f"eval/{k}": v for k, v in metrics.items()})
                if dist_info.main:
                    bar.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if cfg.early_stop_metric is not None and cfg.early_stop_metric not in metrics:
                    raise UserError(f"early_stop_metric {cfg.early_stop_metric!r} is not among {', '.join(metrics)}")
                result.stopped_early = _stop(cfg, metrics)
            due = (cfg.save_every == 0 and evaluated) or (cfg.save_every and (step + 1) % cfg.save_every == 0)
            if out is not None and (due or last or result.stopped_early):
                save(step + 1)
            if result.stopped_early:
                break
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


def _stop(cfg: TrainConfig, metrics: dict) -> bool:
    return cfg.early_stop_metric is not None and _reached(
        metrics.get(cfg.early_stop_metric, float("nan")), cfg.early_stop_value, cfg.early_stop_mode)


def _finished(cfg: TrainConfig, start: int, last_eval: dict) -> bool:
    """A resumed run with nothing left to do: all steps done, or its last evaluation met the stop target."""
    return start == cfg.steps or (bool(last_eval) and cfg.early_stop_metric in last_eval and _stop(cfg, last_eval))


def _scaler(amp, device, sharded: bool):
    """float16 autocast needs loss scaling (its range underflows small gradients); bfloat16 does not."""
    if amp != torch.float16:
        return None
    if sharded:
        # The sharded scaler agrees across ranks on whether any shard overflowed.
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


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


def _save(out, step, model, opt, scaler, config_record, cfg, device, dist_info, logger, last_eval, stopped):
    # Every rank takes part: FSDP gathers shards, and each rank contributes its own RNG state.
    weights = distributed.full_model_state(model, dist_info)
    optim_state = distributed.full_optim_state(model, opt, dist_info)
    rng = distributed.rng_states(device, dist_info)
    if not dist_info.main:
        return
    state = {
        "step": step,
        "optimizer": optim_state,
        "rng": rng,
        "metrics_bytes": logger.tell(),
        "last_eval": dict(last_eval),
        "stopped_early": stopped,
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    save_checkpoint(out, step, weights, config_record, state, keep=cfg.keep_checkpoints)


def _restore(model, opt, scaler, state, ckpt, device, dist_info, cfg) -> tuple[int, dict]:
    try:
        distributed.load_optim_state(model, opt, state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"optimizer state in {ckpt} does not match the model: {e}") from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    start = int(state["step"])
    rngs = state.get("rng")
    if rngs is None:  # checkpoints written before per-rank states: rank 0's generators only
        rngs = [{"cpu": state["torch_rng"]}]
    if len(rngs) == dist_info.world:
        distributed.set_rng_state(rngs[dist_info.rank], device)
    else:  # another world size (resume_override): a fresh stream per rank, still fixed by the seed
        torch.manual_seed(cfg.seed + 1_000_003 * start + dist_info.rank)
    return start, dict(state.get("last_eval") or {})
