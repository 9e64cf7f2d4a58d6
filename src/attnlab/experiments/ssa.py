"""SSA in miniature (arXiv 2306.01705): a byte-level LM trained four ways for the same number of steps, then
evaluated under each inference mode.

Variants (same initial weights, same batches; SSA kernels have no parameters):
  dense          exact attention throughout
  ssa-unbiased   SSA, a uniform N/S subset of keys per layer and example
  ssa-local      SSA, locally biased windows
  ssa-local+ft   the ssa-local model, then a dense fine-tune of `finetune_fraction` × steps more steps
                 (the trainer's `dense_finetune_steps`; fresh AdamW state, lr from `finetune_lr`)

Inference modes: `dense` (the same weights with full attention) for every model, and the self-ensemble
(subsampling kept on, K passes, probabilities averaged; K=1 is a single subsampled pass) for the SSA models.
The paper's claims, checked here: the fine-tuned model's dense loss is within 1 % of the dense baseline or
better, and the self-ensemble beats a single subsampled pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..bench.memory import training_step_peak
from ..errors import UserError
from ..inference.ensemble import attention_mode, evaluate_lm
from ..models.lm import LM
from ..report import line_plot
from ..run.config import DataConfig, RunConfig, lm_run, with_attention, with_optim, with_train
from ..run.experiment import ExperimentConfig, experiment
from ..training.device import autocast


@dataclass
class SSAExperimentConfig(ExperimentConfig):
    data: str = ""
    """a text file or folder (required)"""
    seq_len: int = 1024
    """tokens per training sequence (the model's context)"""
    n_layer: int = 4
    """number of Transformer layers"""
    n_head: int = 4
    """attention heads per layer"""
    d_model: int = 256
    """model width"""
    batch_size: int = 8
    """sequences per training step"""
    steps: int = 2000
    """training steps of each variant"""
    lr: float = 2e-3
    """peak learning rate (AdamW, cosine decay to lr/10)"""
    warmup_steps: int = 100
    """linear learning-rate warm-up steps"""
    factor: int = 4
    """S"""
    spread: float = 1.0
    """local sampling noise, in window widths"""
    finetune_fraction: float = 0.1
    """dense fine-tune length as a share of `steps`"""
    finetune_lr: float = 3e-4
    """peak learning rate of the dense fine-tune"""
    ensemble_k: list[int] = field(default_factory=lambda: [1, 4, 16])
    """self-ensemble sizes K to evaluate the SSA models with"""
    eval_every: int = 250
    """steps between evaluations"""
    eval_batches: int = 8
    """validation windows: eval_batches × batch_size × seq_len tokens"""
    variants: list[str] = field(default_factory=lambda: ["dense", "ssa-unbiased", "ssa-local", "ssa-local+ft"])
    """variants to train: dense, ssa-unbiased, ssa-local, ssa-local+ft"""
    train_fraction: float = 1.0
    """< 1: the data-limited regime — train on this first share of the training split, with dense and both SSA
    samplings at every S in `factors`, each with its dense fine-tune, compared at their best validation loss
    over `seeds` seeds (`variants` and `ensemble_k` are not used there)"""
    factors: list[int] = field(default_factory=list)
    """data-limited regime: the S values (empty: [factor])"""
    seeds: int = 1
    """data-limited regime: seeds from `seed` on"""
    patience: int = 0
    """data-limited regime: stop after this many evaluations without a new best validation loss (0: never)"""


VARIANTS = ("dense", "ssa-unbiased", "ssa-local", "ssa-local+ft")


def base(cfg: SSAExperimentConfig, data: DataConfig) -> RunConfig:
    return lm_run(vocab_size=256, n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model, seq_len=cfg.seq_len,
                  batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                  eval_every=cfg.eval_every, seed=cfg.seed, data=data)


def variant_run(base_cfg: RunConfig, cfg: SSAExperimentConfig, variant: str) -> RunConfig:
    if variant == "dense":
        return base_cfg
    sampling = "unbiased" if variant == "ssa-unbiased" else "local"
    return with_attention(base_cfg, name="ssa", options={"factor": cfg.factor, "sampling": sampling,
                                                         "spread": cfg.spread})


def finetune_run(base_cfg: RunConfig, cfg: SSAExperimentConfig, steps: int) -> RunConfig:
    """The ssa-local model continued with dense attention: the trainer switches every kernel to dense for its
    last `dense_finetune_steps` steps, here all of them; fresh batches (another seed), lower learning rate."""
    run = with_train(base_cfg, steps=steps, seed=cfg.seed + 1, dense_finetune_steps=steps)
    return with_optim(run, lr=cfg.finetune_lr, min_lr=cfg.finetune_lr / 10, warmup_steps=min(10, steps))


@experiment("ssa", SSAExperimentConfig, "SSA: dense vs subsampled training, dense fine-tune and self-ensembles")
def run(cfg: SSAExperimentConfig, ctx) -> dict:
    if cfg.train_fraction != 1.0:
        from .ssa_limited import run_limited

        if cfg.quick:
            cfg = replace(cfg, seq_len=64, n_layer=1, d_model=32, batch_size=4, steps=min(cfg.steps, 30),
                          warmup_steps=5, eval_every=10, eval_batches=2, seeds=min(cfg.seeds, 2), factors=[2])
        return run_limited(cfg, ctx)
    if cfg.quick:
        cfg = replace(cfg, seq_len=256, n_layer=2, d_model=64, batch_size=4, steps=min(cfg.steps, 60),
                      warmup_steps=10, eval_every=20, eval_batches=2)
    bad = [v for v in cfg.variants if v not in VARIANTS]
    if bad or not cfg.variants:
        raise UserError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    if any(k < 1 for k in cfg.ensemble_k) or not cfg.ensemble_k:
        raise UserError("ensemble_k must list sizes of at least 1")
    if cfg.factor < 1 or not 0 <= cfg.finetune_fraction <= 1:
        raise UserError("factor must be >= 1 and finetune_fraction in [0, 1]")
    ft_steps = max(1, round(cfg.steps * cfg.finetune_fraction))
    data, tok, corpus = ctx.text(cfg.data, eval_batches=cfg.eval_batches)
    eval_set = list(corpus.eval_windows("val", cfg.seq_len, cfg.batch_size, max_batches=cfg.eval_batches))
    if not eval_set:
        raise UserError(f"the validation split of {cfg.data} is shorter than one window of {cfg.seq_len}")

    models, rows, curves = {}, [], {}
    plan = [v for v in VARIANTS if v in cfg.variants or (v == "ssa-local" and "ssa-local+ft" in cfg.variants)]
    for variant in plan:
        print(f"== {variant}", flush=True)
        if variant == "ssa-local+ft":
            model, task, res = ctx.train(finetune_run(base(cfg, data), cfg, ft_steps), variant,
                                         model=_clone(models["ssa-local"]), corpus=corpus, tokenizer=tok)
            before = curves["ssa-local"]  # the curve goes on from where ssa-local ended
            curves[variant] = ([before[0][-1]] + [before[0][-1] + e["step"] for e in res.evals],
                               [before[1][-1]] + [e["val_loss"] for e in res.evals])
            with attention_mode(model, "dense"):
                step_s, peak = res.step_s, training_step_peak(model, task, ctx.device)
            steps_done = before[0][-1] + res.steps
        else:
            model, task, res = ctx.train(variant_run(base(cfg, data), cfg, variant), variant, corpus=corpus,
                                         tokenizer=tok)
            curves[variant] = ([e["step"] for e in res.evals], [e["val_loss"] for e in res.evals])
            step_s, peak, steps_done = res.step_s, training_step_peak(model, task, ctx.device), res.steps
        models[variant] = model
        rows.append({"variant": variant, "steps": steps_done, "step_s": step_s, "peak_MB": peak})
        print(f"   {variant}: {steps_done} steps, {step_s:.3f} s/step", flush=True)

    # Every model under every inference mode that applies to it, on the same validation windows.
    evals = []
    for variant in (v for v in plan if v in cfg.variants):
        model = models[variant].to(ctx.device)
        ks = [] if variant == "dense" else cfg.ensemble_k
        for mode, label, k in [("dense", "dense", 1)] + [("sample", f"ensemble K={k}", k) for k in ks]:
            with autocast(ctx.device, ctx.amp):
                m = evaluate_lm(model, eval_set, mode=mode, k=k, seed=cfg.seed, device=ctx.device)
            evals.append({"variant": variant, "mode": label, "k": k, "loss": m["loss"], "ppl": m["ppl"]})
        print(f"   {variant}: " + ", ".join(f"{e['mode']} {e['loss']:.4f}" for e in evals if e["variant"] == variant), flush=True)

    return _write(cfg, ctx, rows, evals, curves, ft_steps)


def _clone(model: LM) -> LM:
    twin = LM(model.cfg)
    twin.load_state_dict(model.state_dict())
    return twin.to(next(model.parameters()).device)


def _write(cfg, ctx, rows, evals, curves, ft_steps) -> dict:
    loss = {(e["variant"], e["mode"]): e["loss"] for e in evals}
    base_step = next((r["step_s"] for r in rows if r["variant"] == "dense"), None)
    for r in rows:
        r["step_vs_dense"] = base_step / r["step_s"] if base_step and r["variant"] != "ssa-local+ft" else None
        r["dense_eval_loss"] = loss.get((r["variant"], "dense"))
        for k in cfg.ensemble_k:
            r[f"ensemble_K{k}"] = loss.get((r["variant"], f"ensemble K={k}"))
    ctx.report.csv("evals.csv", evals)
    ctx.report.csv("runs.csv", rows)

    claims = {}
    base = loss.get(("dense", "dense"))
    ft = loss.get(("ssa-local+ft", "dense"))
    if base is not None and ft is not None:
        rel = (ft - base) / base
        claims["finetuned_dense_vs_baseline_rel"] = rel
        claims["finetuned_within_1pct_or_better"] = rel <= 0.01
    kmin, kmax = min(cfg.ensemble_k), max(cfg.ensemble_k)
    for v in ("ssa-unbiased", "ssa-local", "ssa-local+ft"):
        single, ens = loss.get((v, f"ensemble K={kmin}")), loss.get((v, f"ensemble K={kmax}"))
        if single is not None and ens is not None and kmax > kmin:
            claims[f"{v}_ensemble_K{kmax}_beats_K{kmin}"] = ens < single

    plots = [line_plot(ctx.out / "val_loss.png", curves, xlabel="step",
                       ylabel="validation loss (nats/byte, model's own eval mode)",
                       title="Training curves (SSA evaluates dense in eval)")]
    series = {}
    ks = sorted(cfg.ensemble_k)
    for v in ("ssa-unbiased", "ssa-local", "ssa-local+ft"):
        ys = [loss.get((v, f"ensemble K={k}")) for k in ks]
        if all(y is not None for y in ys):
            series[f"{v}: self-ensemble"] = (ks, ys)
    for v in ("dense", "ssa-local+ft", "ssa-local", "ssa-unbiased"):
        d = loss.get((v, "dense"))
        if d is not None:
            series[f"{v}: dense eval"] = ([ks[0], ks[-1]], [d, d])
    if series:
        plots.append(line_plot(ctx.out / "inference_modes.png", series, xlabel="ensemble size K (passes)",
                               ylabel="validation loss (nats/byte)", title="Inference modes", logx=len(ks) > 1))

    r = ctx.report
    r.h("SSA: subsampled training, dense fine-tune and self-ensembles", 1)
    r.p(f"Corpus {cfg.data} (bytes; validation: {cfg.eval_batches} batches × "
        f"{cfg.batch_size} × {cfg.seq_len} tokens from the held-out tail). Model: {cfg.n_layer} layers, "
        f"d={cfg.d_model}, {cfg.n_head} heads, rotary, context {cfg.seq_len}; {cfg.steps} steps of AdamW "
        f"(lr {cfg.lr}, cosine, batch {cfg.batch_size}); SSA factor S={cfg.factor}, local spread {cfg.spread} "
        f"window widths; dense fine-tune {ft_steps} extra steps at lr {cfg.finetune_lr}. Device {ctx.device}"
        f"{', quick run' if cfg.quick else ''}.")
    r.h("Training cost", 2)
    r.p("Wall time per optimizer step as the trainer measured it; peak = tensor memory of one training "
        "forward+backward (attnlab.bench.memory). The fine-tune row's step time is that of its dense steps.")
    r.table(rows, ["variant", "steps", "step_s", "step_vs_dense", "peak_MB"])
    r.h("Validation loss by inference mode", 2)
    r.p("`dense_eval_loss`: full attention with the trained weights. `ensemble_K<k>`: subsampling kept on, "
        "k passes, probabilities averaged (K=1 is a single subsampled pass).")
    r.table(rows, ["variant", "dense_eval_loss"] + [f"ensemble_K{k}" for k in cfg.ensemble_k], fmt="{:.4f}")
    r.h("The paper's claims, in miniature", 2)
    r.table([{"claim": k, "result": v} for k, v in claims.items()], fmt="{:+.4f}")
    for p in plots:
        r.image(p, p.stem)
    r.save()
    return {"runs": rows, "evals": evals, "claims": claims, "finetune_steps": ft_steps}
