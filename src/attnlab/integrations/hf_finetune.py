"""`attnlab finetune`: continue training a pretrained causal LM on a text file with attnlab attention in place.

The model (a transformers directory or a GGUF file, `hf_load`) gets an attnlab kernel patched into the chosen
layers (`hf.patch_model`: hyper with or without pre-scoring, ssa, exact; "none" keeps the model's own) and/or
a key/value transform retrofitted at identity (`hf_transform`: KV shifting), and is then trained either in full
or through LoRA adapters (PEFT), with optional gradient checkpointing and bf16 autocast. Held-out perplexity
is measured before and after with the mechanism in place.

The text's last `val_fraction` is held out; training draws random windows of `context` tokens (seeded) from the
rest. The result is saved with `save_pretrained` (safetensors; LoRA adapters merged into the weights) next to
the tokenizer, with the kernels unpatched and the transforms taken out first, so plain transformers loads it:
when the attention was changed, that model is the fine-tuned weights under the model's own attention;
`load_finetuned` (or `attnlab hf-eval` with the same --attention) restores what it was trained with, from
`attnlab.json` and, for a transform, `attnlab_transform.safetensors` (`hf_saved`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..attention.registry import kernel_entry, select_layers
from ..errors import UserError, require_file
from ..training.device import resolve_device
from .hf import attention_modules, patch_model
from .hf_load import DTYPES, load_pretrained
from .hf_saved import load_finetuned, save_finetuned  # noqa: F401  (load_finetuned: part of this module's API)
from .hf_transform import add_transform
from .resources import PeakMemory


@dataclass
class FinetuneConfig:
    """Fine-tune a local causal LM (directory or GGUF) on a text file, with attnlab attention patched in."""

    model: str = ""
    """a local checkpoint directory, or a .gguf file"""
    gguf_file: str | None = None
    """a GGUF file to load instead (a path, or a name inside --model)"""
    data: str = ""
    """a UTF-8 text file to train on (its last --val_fraction is held out)"""
    out: str = ""
    """directory to save the fine-tuned model, its tokenizer and finetune.json into"""
    attention: str = "none"
    """the attnlab mechanism patched in (`attnlab list`), or none (the model's own attention)"""
    options: dict[str, Any] = field(default_factory=dict)
    """the mechanism's options, e.g. {"prescore": "kmeans", "min_seq_len": 256}"""
    layers: str = "all"
    """where mechanism and transform go: all, first:N, last:N, odd, even, or 0,3,5"""
    transform: str | None = None
    """a key/value transform to retrofit at identity in the same layers (kv_shift), or none"""
    transform_options: dict[str, Any] = field(default_factory=dict)
    """the transform's options, e.g. {"window": 1}"""
    method: Literal["lora", "full"] = "lora"
    """full: train every weight; lora: train low-rank adapters (PEFT), merged into the weights on save"""
    lora_r: int = 8
    """LoRA rank"""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / r)"""
    lora_dropout: float = 0.0
    """dropout on the LoRA branch"""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    """comma-separated names of the linear layers that get adapters, or all-linear"""
    lora_layers: str = "all"
    """decoder layers whose targets get adapters (all, last:N, ...): adapters only in the last layers also cut
    the backward pass short"""
    context: int = 512
    """tokens per training window"""
    batch_size: int = 4
    """windows per optimiser step (per accumulation micro-step)"""
    grad_accum: int = 1
    """micro-steps accumulated per optimiser step"""
    steps: int = 100
    """optimiser steps"""
    lr: float = 2e-4
    """peak learning rate (linear warm-up, cosine decay to 10%)"""
    warmup: int = 10
    """warm-up steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """gradient norm clip (0: none)"""
    gradient_checkpointing: bool = False
    """recompute layer activations in the backward pass (less memory, about a third more compute)"""
    bf16: bool = False
    """bf16 autocast for forward and backward (weights and optimiser stay in the loaded dtype)"""
    val_fraction: float = 0.1
    """share of the text held out for the perplexity before and after"""
    eval_context: int = 0
    """tokens per held-out window (0: --context)"""
    eval_windows: int = 4
    """held-out windows scored before and after (0: skip the evaluation)"""
    minutes: float = 0.0
    """stop training after this long (0: no limit)"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """the dtype the model is loaded and trained in"""
    seed: int = 0
    """seed of the windows drawn, the LoRA initialisation and stochastic mechanisms"""
    progress: bool = True
    """show a progress bar"""
    save: bool = True
    """save the fine-tuned model into --out"""
    overwrite: bool = False
    """allow --out to hold an earlier result"""


def finetune(cfg: FinetuneConfig) -> dict:
    """Run the fine-tune described by `cfg`: measure, train, measure, save; print a summary, return the record."""
    _check(cfg)
    device, _ = resolve_device(cfg.device, "float32")
    torch.manual_seed(cfg.seed)
    tokenizer, model = load_pretrained(cfg.model or None, cfg.gguf_file, dtype=cfg.dtype, device=device)
    train_ids, val_ids = token_split(tokenizer, Path(cfg.data), cfg.val_fraction, cfg.context)
    eval_ctx = cfg.eval_context or cfg.context
    held = heldout_windows(val_ids, eval_ctx, cfg.eval_windows) if cfg.eval_windows else None
    patched, shifted = install(model, cfg)
    record: dict[str, Any] = {"config": asdict(cfg), "patched_layers": patched, "transform_layers": shifted}
    if held is not None:
        record["heldout_before"] = heldout_nll(model, held, cfg.batch_size, cfg.bf16, cfg.seed)
    trainee = wrap_for_training(model, cfg)
    record["params"] = param_counts(trainee)
    record["train"] = train(trainee, train_ids, cfg, device)
    model = unwrap(trainee)
    if held is not None:
        record["heldout_after"] = heldout_nll(model, held, cfg.batch_size, cfg.bf16, cfg.seed)
    record["versions"] = _versions()
    if cfg.save:
        save_finetuned(model, tokenizer, Path(cfg.out), record)
    print(format_summary(record))
    return record


def install(model: nn.Module, cfg) -> tuple[list[int], list[int]]:
    """Patch the kernel and add the transform that `cfg` asks for; returns (patched layers, transform layers)."""
    patched, shifted = [], []
    if cfg.attention != "none":
        patched = patch_model(model, cfg.attention, cfg.options, cfg.layers, decode="exact")
    if cfg.transform:
        shifted = add_transform(model, cfg.transform, cfg.transform_options, cfg.layers, identity=True)
    return patched, shifted


def wrap_for_training(model: nn.Module, cfg) -> nn.Module:
    """The model to optimise: itself with every weight trainable (full), or a PEFT LoRA wrapper whose adapters
    and retrofitted transforms are the trainable parameters."""
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}  # the reentrant variant needs inputs that require grad (LoRA has none)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name; 4.x has the old one only
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model.train()
    from peft import LoraConfig, get_peft_model

    targets = check_lora_targets(model, cfg.lora_targets)
    where = {}
    if cfg.lora_layers != "all":
        n_layer = max(attention_modules(model)) + 1
        where = {"layers_to_transform": select_layers(cfg.lora_layers, n_layer)}
        if not where["layers_to_transform"]:
            raise UserError(f"--lora_layers {cfg.lora_layers!r} selects no layer")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=targets, task_type="CAUSAL_LM", **where)
    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(model, lora)
    for name, p in peft_model.named_parameters():
        if ".attnlab_transform." in name:
            p.requires_grad_(True)  # PEFT froze everything but the adapters; the transform is trained too
    return peft_model.train()


def unwrap(trainee: nn.Module) -> nn.Module:
    """The plain model again, LoRA adapters merged into its weights, in eval mode."""
    model = trainee.merge_and_unload() if hasattr(trainee, "merge_and_unload") else trainee
    if getattr(model, "supports_gradient_checkpointing", False):
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    return model.eval()


def check_lora_targets(model: nn.Module, spec: str) -> list[str] | str:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if names == ["all-linear"]:
        return "all-linear"
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    missing = [t for t in names if t not in linear]
    if not names or missing:
        raise UserError(f"LoRA target modules not in {type(model).__name__}: {', '.join(missing) or '(none given)'}"
                        f" (its linear layers: {', '.join(linear)}, or all-linear)")
    return names


def param_counts(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def train(model: nn.Module, ids: torch.Tensor, cfg, device: torch.device, log=None) -> dict:
    """Optimise for cfg.steps steps on random windows of `ids`; returns losses, time, throughput, memory."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    starts_max = len(ids) - cfg.context
    losses: list[float] = []
    bar = _bar(cfg.steps, cfg.progress)
    tokens, step = 0, 0
    model.train()
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        for step in range(cfg.steps):
            if cfg.minutes and time.perf_counter() - t0 > cfg.minutes * 60:
                break
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            total = 0.0
            for _ in range(cfg.grad_accum):
                starts = torch.randint(0, starts_max + 1, (cfg.batch_size,), generator=gen)
                x = torch.stack([ids[s : s + cfg.context] for s in starts.tolist()]).to(device)
                with _autocast(device, cfg.bf16):
                    loss = model(input_ids=x, labels=x).loss / cfg.grad_accum
                loss.backward()
                total += loss.item()
                tokens += x.numel()
            if not math.isfinite(total):
                raise UserError(f"the training loss became {total} at step {step}; lower --lr")
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total)
            if bar is not None:
                bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
                bar.update(1)
            if log is not None:
                log(step, total)
        else:
            step = cfg.steps
        seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    tail = losses[-max(1, len(losses) // 10):] if losses else []
    return {"steps_done": step, "seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / max(seconds, 1e-9),
            "loss_first": losses[0] if losses else None, "loss_last_10pct": sum(tail) / len(tail) if tail else None,
            "losses": losses, **mem.summary()}


def heldout_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, bf16: bool = False,
                seed: int = 0) -> dict:
    """Mean next-token negative log-likelihood (nats) and e-based perplexity over `windows` [W, N]."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    torch.manual_seed(seed)
    with torch.no_grad():
        for s in range(0, len(windows), batch_size):
            x = windows[s : s + batch_size].to(device)
            with _autocast(device, bf16):
                logits = model(input_ids=x, use_cache=False).logits
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)
            total -= float(lp.double().sum())
            count += lp.numel()
    model.train(was_training)
    nll = total / count
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": count, "windows": len(windows),
            "context": windows.shape[1]}


def token_split(tokenizer, path: Path, val_fraction: float, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids, held-out ids): the file's tokens, the last `val_fraction` held out."""
    require_file(path, "data file")
    ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False,
                    verbose=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    cut = int(len(ids) * (1 - val_fraction))
    if cut < context + 1:
        raise UserError(f"{path} holds {len(ids)} tokens; training windows of --context {context} need at least "
                        f"{context + 1} outside the held-out {val_fraction:.0%}")
    return ids[:cut], ids[cut:]


def heldout_windows(ids: torch.Tensor, context: int, windows: int) -> torch.Tensor:
    have = len(ids) // context
    if have < 1:
        raise UserError(f"the held-out text holds {len(ids)} tokens, fewer than one window of {context}; raise "
                        "--val_fraction, lower --eval_context, or set --eval_windows 0")
    n = min(have, windows) if windows else have
    return ids[: n * context].view(n, context)


def format_summary(r: dict) -> str:
    t, p = r["train"], r["params"]
    cfg = r["config"]
    lines = [f"fine-tuned {cfg['gguf_file'] or cfg['model']} ({cfg['method']}, attention {cfg['attention']} in "
             f"layers {r['patched_layers']}, transform {cfg['transform'] or 'none'}): {t['steps_done']} steps, "
             f"{t['tokens']} tokens in {t['seconds']:.1f}s = {t['tokens_per_second']:.1f} tokens/s, "
             f"{p['trainable']:,} of {p['total']:,} parameters trained, {PeakMemory.describe(t)}"]
    if "heldout_before" in r:
        b, a = r["heldout_before"], r["heldout_after"]
        lines.append(f"held-out perplexity ({b['windows']} x {b['context']} tokens): {b['perplexity']:.3f} -> "
                     f"{a['perplexity']:.3f}")
    if cfg["save"]:
        lines.append(f"saved to {cfg['out']}")
    return "\n".join(lines)


def _lr_at(step: int, cfg) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def _bar(total: int, on: bool):
    if not on:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="finetune", unit="step", dynamic_ncols=True)


def _versions() -> dict:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    return out


def _check(cfg: FinetuneConfig) -> None:
    if not cfg.model and not cfg.gguf_file:
        raise UserError("--model is required: a transformers checkpoint directory or a .gguf file (or --gguf_file)")
    if not cfg.data:
        raise UserError("--data is required: a UTF-8 text file to train on")
    if cfg.save and not cfg.out:
        raise UserError("--out is required to save the result (or --save false)")
    if cfg.save and not cfg.overwrite and Path(cfg.out).exists() and any(Path(cfg.out).iterdir()):
        raise UserError(f"{cfg.out} is not empty; pass --overwrite true to write over it")
    for name in ("context", "batch_size", "grad_accum", "steps", "lora_r"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("warmup", "eval_windows", "eval_context"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be 0 or more, got {getattr(cfg, name)}")
    if cfg.context < 2:
        raise UserError("--context must be at least 2 tokens")
    if not 0 <= cfg.val_fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.eval_windows and cfg.val_fraction == 0:
        raise UserError("--eval_windows needs a held-out share: set --val_fraction above 0 or --eval_windows 0")
    if not cfg.lr > 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    if cfg.method not in ("lora", "full"):
        raise UserError(f"--method must be lora or full, got {cfg.method!r}")
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if not 0 <= cfg.lora_dropout < 1:
        raise UserError(f"--lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.attention != "none":
        kernel_entry(cfg.attention)
    if cfg.method == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise UserError("LoRA needs peft: pip install 'attnlab[hf]' (or --method full)") from None
