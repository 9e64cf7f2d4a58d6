"""The deployment pipeline in miniature: a teacher (the nanoGPT recipe at 4 layers) → small students (with and
without KV shifting) distilled from it, against the same students trained from scratch for the same steps and
seeds → int8 (dynamic) copies of the teacher and the distilled students. Every stage is measured alike:
parameters, size on disk, eval and generate tokens/s on `threads` CPU threads, and validation loss.

Within a seed a distilled student and its scratch twin start from the same weights and see the same batches,
so their difference is the teacher's doing.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from ..bench.measure import mean_std
from ..commands.quantize import quantize_run
from ..errors import UserError
from ..inference.generate import generate
from ..report import figure
from ..run.build import build
from ..run.config import DataConfig, RunConfig, lm_run, with_attention, with_model
from ..run.evaluate import evaluate
from ..run.experiment import ExperimentConfig, experiment
from ..run.lm import lm_task
from ..run.load import load_run
from ..tasks.distill import DistillTask
from ..training.checkpoint import _state_for_safetensors


@dataclass
class DeployConfig(ExperimentConfig):
    data: str = ""
    """a text file or folder (required)"""
    tokenizer: Literal["char", "byte"] = "char"
    """char: the corpus's characters; byte: the 256 byte values"""
    d_model: int = 256
    """width of teacher and students (the nanoGPT recipe uses 384 at 6 layers)"""
    n_head: int = 4
    """attention heads per layer"""
    teacher_layers: int = 4
    """the teacher's layers"""
    student_layers: int = 2
    """each student's layers"""
    seq_len: int = 256
    """context of every model"""
    batch_size: int = 32
    """sequences per training step"""
    teacher_steps: int = 2000
    """the teacher's training steps"""
    student_steps: int = 1000
    """every student's training steps, distilled or from scratch"""
    lr: float = 1e-3
    """peak learning rate (AdamW, cosine decay to lr/10)"""
    alpha: float = 0.5
    """weight of the KL term in distillation"""
    temperature: float = 2.0
    """distillation temperature"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """seeds of the students"""
    eval_batches: int = 10
    """validation batches per evaluation"""
    threads: int = 1
    """CPU threads for the speed measurements"""
    gen_tokens: int = 64
    """tokens generated per speed measurement"""


def teacher_run(cfg: DeployConfig, data: DataConfig, vocab: int) -> RunConfig:
    return lm_run(vocab_size=vocab, n_layer=cfg.teacher_layers, n_head=cfg.n_head, d_model=cfg.d_model,
                  seq_len=cfg.seq_len, batch_size=cfg.batch_size, steps=cfg.teacher_steps, lr=cfg.lr,
                  warmup_steps=min(100, cfg.teacher_steps // 10), eval_every=max(1, cfg.teacher_steps // 5),
                  seed=cfg.seed, data=data)


def student_run(cfg: DeployConfig, data: DataConfig, vocab: int, seed: int, kv_shift: bool) -> RunConfig:
    t = teacher_run(cfg, data, vocab)
    base = replace(t, train=replace(t.train, steps=cfg.student_steps, seed=seed,
                                    eval_every=max(1, cfg.student_steps // 5)))
    base = with_model(base, n_layer=cfg.student_layers)
    return with_attention(base, transform="kv_shift" if kv_shift else "none")


def measure(path, cfg: DeployConfig, stage: str) -> dict:
    """The same five figures for any run folder (fp32 or int8), on CPU."""
    run = load_run(path)
    model = run.model.cpu().eval()
    ckpt_bytes = (run.ckpt / "model.safetensors").stat().st_size
    loss = evaluate(model, lm_task(run, batch_size=8, seed=cfg.seed), split="val", batches=cfg.eval_batches,
                    device=torch.device("cpu"), amp=None)["loss"]
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        x = torch.randint(0, model.cfg.vocab_size, (4, model.cfg.max_seq_len), generator=torch.Generator().manual_seed(0))
        n_gen = min(cfg.gen_tokens, model.cfg.max_seq_len - 8)
        with torch.inference_mode():
            model(x)  # warm-up: kernel choice, prepacking
            t_eval = min(_time(lambda: model(x)) for _ in range(3))
            generate(model, x[:1, :8], 4, temperature=0.0)
            t_gen = min(_time(lambda: generate(model, x[:1, :8], n_gen, temperature=0.0)) for _ in range(3))
    finally:
        torch.set_num_threads(threads)
    params = sum(t.numel() for t in _state_for_safetensors(model).values())  # tied tables once; int8 scales count
    return {"stage": stage, "params": params, "bytes": ckpt_bytes, "eval_tok_s": x.numel() / t_eval,
            "gen_tok_s": n_gen / t_gen, "val_loss": loss}


def _time(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


@experiment("deploy", DeployConfig, "teacher → distilled students (± KV shift) vs scratch → int8: size, speed, loss")
def run(cfg: DeployConfig, ctx) -> dict:
    if not cfg.seeds:
        raise UserError("deploy needs at least one seed")
    if cfg.quick:
        cfg = replace(cfg, d_model=min(cfg.d_model, 64), seq_len=min(cfg.seq_len, 64),
                      batch_size=min(cfg.batch_size, 8), teacher_steps=min(cfg.teacher_steps, 60),
                      student_steps=min(cfg.student_steps, 30), student_layers=1, seeds=cfg.seeds[:1],
                      eval_batches=min(cfg.eval_batches, 2), gen_tokens=min(cfg.gen_tokens, 16))
    data, tok, corpus = ctx.text(cfg.data, tokenizer=cfg.tokenizer, eval_batches=cfg.eval_batches)
    print("== teacher", flush=True)
    teacher, _, tres = ctx.train(teacher_run(cfg, data, tok.vocab_size), "teacher", corpus=corpus, tokenizer=tok,
                                 record=True)
    tok.save(ctx.out / "runs" / "teacher" / "tokenizer")
    teacher = teacher.eval()
    runs = []
    for seed in cfg.seeds:
        for kv in (False, True):
            tag = "kv_shift" if kv else "vanilla"
            scfg = student_run(cfg, data, tok.vocab_size, seed, kv)
            for how in ("scratch", "distilled"):
                name = f"student-{tag}-{how}-seed{seed}"
                print(f"== {name}", flush=True)
                built = build(scfg, paired=True, corpus=corpus, tokenizer=tok)
                task = built.task if how == "scratch" else DistillTask(built.task, teacher, alpha=cfg.alpha,
                                                                       temperature=cfg.temperature)
                _, _, res = ctx.train(built.config, name, model=built.model, task=task, tokenizer=tok, record=True)
                tok.save(ctx.out / "runs" / name / "tokenizer")
                runs.append({"student": tag, "how": how, "seed": seed, "val_loss": res.final["val_loss"]})
    stages = [measure(ctx.out / "runs" / "teacher", cfg, "teacher fp32")]
    q = quantize_run(ctx.out / "runs" / "teacher", ctx.out / "int8" / "teacher")
    stages.append(measure(q["out"], cfg, "teacher int8"))
    for tag in ("vanilla", "kv_shift"):
        for how in ("scratch", "distilled"):
            path = ctx.out / "runs" / f"student-{tag}-{how}-seed{cfg.seeds[0]}"
            stages.append(measure(path, cfg, f"student {tag} {how} fp32"))
        q = quantize_run(path, ctx.out / "int8" / f"student-{tag}")
        stages.append(measure(q["out"], cfg, f"student {tag} distilled int8"))
    comparison = []
    for tag in ("vanilla", "kv_shift"):
        by = {how: {r["seed"]: r["val_loss"] for r in runs if r["student"] == tag and r["how"] == how}
              for how in ("scratch", "distilled")}
        d_mean, d_std = mean_std([by["distilled"][s] - by["scratch"][s] for s in cfg.seeds])
        comparison.append({"student": tag, "seeds": len(cfg.seeds),
                           "scratch": statistics.fmean(by["scratch"].values()),
                           "distilled": statistics.fmean(by["distilled"].values()),
                           "distilled_minus_scratch": d_mean, "std": d_std,
                           "distilled_wins": sum(by["distilled"][s] < by["scratch"][s] for s in cfg.seeds)})
    ctx.report.csv("students.csv", runs)
    ctx.report.csv("stages.csv", stages)
    _plot(ctx.out / "stages.png", stages)
    r = ctx.report
    r.h("Deployment: distillation and int8", 1)
    r.p(f"Corpus {cfg.data} ({cfg.tokenizer}); d {cfg.d_model}, {cfg.n_head} heads, context {cfg.seq_len}. Teacher "
        f"{cfg.teacher_layers} layers, {cfg.teacher_steps} steps (final val loss {tres.final['val_loss']:.4f}); "
        f"students {cfg.student_layers} layers, {cfg.student_steps} steps each, α {cfg.alpha}, T {cfg.temperature}, "
        f"seeds {cfg.seeds}. Speeds on {cfg.threads} CPU thread(s), best of 3 (process CPU time); "
        f"int8 is dynamic int8 (`attnlab quantize`). Stage rows are for seed {cfg.seeds[0]}.")
    r.h("Distilled against scratch at equal steps")
    r.table(comparison, fmt="{:.4f}")
    r.h("Stages")
    r.table(stages, fmt="{:.4g}")
    r.p("![stages](stages.png)")
    r.save()
    return {"comparison": comparison, "stages": stages, "teacher_val_loss": tres.final["val_loss"]}


def _plot(path: Path, stages: list[dict]) -> None:
    def draw(fig, plt):
        names = [s["stage"] for s in stages]
        for i, (key, label) in enumerate((("val_loss", "validation loss"), ("bytes", "size on disk (bytes)"),
                                          ("gen_tok_s", "generate tokens/s"))):
            ax = fig.add_subplot(1, 3, i + 1)
            ax.barh(range(len(names)), [s[key] for s in stages])
            ax.set_yticks(range(len(names)), names if i == 0 else [""] * len(names), fontsize=7)
            ax.set_xlabel(label)
            ax.invert_yaxis()

    figure(path, draw, size=(12, 4.2))
