"""SSA on images (arXiv 2306.01705): a ViT trained with dense attention and with stochastically subsampled
attention, in a regime where the dense model overfits (a 2k-image subset, no augmentation, enough epochs
that dense validation loss turns up).

Variants per seed (same initial weights and batches; SSA has no parameters): dense, and SSA with unbiased and
local sampling at each factor S. Every model then gets a short dense fine-tune (fresh AdamW state, lower
learning rate; the dense model too, so all have trained equally long). Reported, as mean ± standard error over
seeds: accuracy of the trained weights under dense attention, after the fine-tune, and as a self-ensemble of
K subsampled passes (K = 1 is a single subsampled pass); wall time per training step and its peak memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..bench.memory import training_step_peak
from ..errors import UserError
from ..inference.ensemble import attention_mode
from ..report import figure, line_plot, markdown_table
from ..run.experiment import ExperimentConfig, experiment
from .vit_runs import clone, mean_se, pm, quick, setup, train_vit, with_vit_attention


@dataclass
class SSAViTConfig(ExperimentConfig):
    data: str = ""
    """a folder of IDX files (Fashion-MNIST: /usr/share/datasets/fashion-mnist) or of class sub-folders"""
    limit_train: int = 2000
    """training images (a random subset; 0: all): few enough that the dense model overfits"""
    eval_images: int = 2000
    """test images (validation where the data has no test split) scored per evaluation; 0: all"""
    augment: bool = False
    """flip the training images (off: the overfitting regime)"""
    patch_size: int = 4
    """patch side (4 on 28×28: 49 patches + the class token)"""
    d_model: int = 64
    """ViT width"""
    n_layer: int = 4
    """ViT blocks"""
    n_head: int = 4
    """attention heads"""
    batch_size: int = 128
    """training images per step"""
    steps: int = 800
    """training steps of each variant (800 × 128 = 51 epochs of 2k images)"""
    lr: float = 2e-3
    """peak learning rate (AdamW, cosine decay to lr/100)"""
    warmup_steps: int = 100
    """linear warm-up steps"""
    eval_every: int = 50
    """validation (loss curves) every this many steps"""
    factors: list[int] = field(default_factory=lambda: [2, 4])
    """SSA subsampling factors S"""
    samplings: list[str] = field(default_factory=lambda: ["unbiased", "local"])
    """SSA sampling kinds"""
    spread: float = 1.0
    """local sampling noise, in window widths"""
    finetune_fraction: float = 0.1
    """dense fine-tune length as a share of steps"""
    finetune_lr: float = 3e-4
    """fine-tune learning rate"""
    ensemble_k: list[int] = field(default_factory=lambda: [1, 4, 16])
    """self-ensemble sizes (subsampled passes averaged)"""
    n_seeds: int = 3
    """seeds seed, seed+1, ...: each trains every variant"""


def variants(cfg: SSAViTConfig) -> dict[str, dict | None]:
    """{label: SSA options, or None for dense}."""
    out: dict[str, dict | None] = {"dense": None}
    for sampling in cfg.samplings:
        for s in cfg.factors:
            out[f"ssa-{sampling} S={s}"] = {"factor": s, "sampling": sampling, "spread": cfg.spread}
    return out


def finetune_run(run, cfg: SSAViTConfig, steps: int):
    """Dense attention for every step (the trainer's dense_finetune_steps), other batches, lower lr."""
    train = replace(run.train, steps=steps, dense_finetune_steps=steps, seed=run.train.seed + 1000,
                    eval_every=0)
    optim = replace(run.optim, lr=cfg.finetune_lr, min_lr=cfg.finetune_lr / 10, warmup_steps=min(10, steps))
    return replace(run, train=train, optim=optim)


def _check(cfg: SSAViTConfig) -> None:
    if any(s not in ("unbiased", "local") for s in cfg.samplings):
        raise UserError(f"samplings must be unbiased and/or local, got {cfg.samplings}")
    if any(f < 1 for f in cfg.factors) or not cfg.ensemble_k or min(cfg.ensemble_k) < 1:
        raise UserError("factors and ensemble_k must list numbers of at least 1")
    if cfg.n_seeds < 1 or not 0 < cfg.finetune_fraction <= 1:
        raise UserError("n_seeds must be at least 1 and finetune_fraction in (0, 1]")


@experiment("vit-ssa", SSAViTConfig,
            "ViT on images: dense vs SSA (unbiased, local; S=2, 4), dense fine-tune, self-ensembles, step cost")
def run(cfg: SSAViTConfig, ctx) -> dict:
    if cfg.quick:
        cfg = quick(cfg, steps=60, eval_every=20)
    _check(cfg)
    prep = setup(cfg, ctx, "vit-ssa", augment=cfg.augment, flip=cfg.augment, crop_padding=0)
    data, score = prep.data, prep.score
    ft_steps = max(1, round(cfg.steps * cfg.finetune_fraction))
    rows, curves = [], {}
    for seed in range(cfg.seed, cfg.seed + cfg.n_seeds):
        base = prep.base(seed)
        for label, opts in variants(cfg).items():
            print(f"== {label}, seed {seed}", flush=True)
            run_cfg = base if opts is None else with_vit_attention(base, "ssa", opts)
            model, task, res = train_vit(ctx, run_cfg, data, f"{label.replace(' ', '_')}-s{seed}")
            curves.setdefault(label, []).append(([e["step"] for e in res.evals], [e["val_loss"] for e in res.evals]))
            row = {"variant": label, "seed": seed, "steps": res.steps, "step_s": res.step_s,
                   "peak_MB": training_step_peak(model, task, ctx.device)}
            row["dense_eval"] = score(model, mode="dense")["accuracy"]
            if opts is not None:
                for k in cfg.ensemble_k:
                    row[f"ensemble_K{k}"] = score(model, mode="sample", k=k, seed=seed)["accuracy"]
            tuned, _, _ = train_vit(ctx, finetune_run(run_cfg, cfg, ft_steps), data,
                                    f"{label.replace(' ', '_')}+ft-s{seed}", model=clone(model))
            with attention_mode(tuned, "dense"):
                row["finetuned"] = score(tuned)["accuracy"]
            rows.append(row)
            print("   " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return _write(cfg, ctx, rows, curves, ft_steps, prep.split, score)


def _write(cfg, ctx, rows, curves, ft_steps, split, score) -> dict:
    ctx.report.csv("runs.csv", rows)
    labels = list(variants(cfg))
    cols = ["dense_eval", "finetuned"] + [f"ensemble_K{k}" for k in cfg.ensemble_k] + ["step_s", "peak_MB"]
    summary = {}
    for label in labels:
        rs = [r for r in rows if r["variant"] == label]
        summary[label] = {c: mean_se([r[c] for r in rs]) for c in cols if all(c in r for r in rs)}
    dense_step = summary["dense"]["step_s"][0]
    dense_ft = [r["finetuned"] for r in rows if r["variant"] == "dense"]
    claims = []
    kmin, kmax = min(cfg.ensemble_k), max(cfg.ensemble_k)
    for label in labels[1:]:
        rs = [r for r in rows if r["variant"] == label]
        gain = mean_se([r["finetuned"] - d for r, d in zip(rs, dense_ft)])  # paired by seed
        ens = mean_se([r[f"ensemble_K{kmax}"] - r[f"ensemble_K{kmin}"] for r in rs]) if kmax > kmin else None
        claims.append({"variant": label, "finetuned − dense (pts)": pm(*gain),
                       "finetuned ≥ dense": gain[0] >= 0,
                       f"K={kmax} − K={kmin} (pts)": pm(*ens) if ens else "",
                       "ensemble beats one pass": bool(ens and ens[0] > 0),
                       "step cost vs dense": f"{summary[label]['step_s'][0] / dense_step:.2f}×"})
    table = [{"variant": label, **{c: (pm(*summary[label][c]) if c not in ("step_s", "peak_MB") else
                                      pm(*summary[label][c], scale=1e3 if c == "step_s" else 1, digits=1))
                                   for c in cols if c in summary[label]}} for label in labels]

    # Dense validation loss over training, mean over seeds: where it turns up is where the model overfits.
    mean_curves = {}
    for label, cs in curves.items():
        xs = cs[0][0]
        mean_curves[label] = (xs, [sum(c[1][i] for c in cs) / len(cs) for i in range(len(xs))])
    plots = [line_plot(ctx.out / "val_loss.png", mean_curves, xlabel="step",
                       ylabel="validation loss (dense attention in eval)",
                       title=f"ViT on {score.train_images} images: validation loss, mean of {cfg.n_seeds} seed(s)")]
    dense_curve = mean_curves["dense"][1]
    turn = min(range(len(dense_curve)), key=dense_curve.__getitem__) if dense_curve else None
    overfit = {"min_step": mean_curves["dense"][0][turn], "min_loss": dense_curve[turn],
               "final_loss": dense_curve[-1]} if dense_curve else {}

    def draw(fig, plt):
        ax = fig.add_subplot(1, 1, 1)
        for label in labels[1:]:
            ks = [k for k in cfg.ensemble_k]
            m = [100 * summary[label][f"ensemble_K{k}"][0] for k in ks]
            e = [100 * (summary[label][f"ensemble_K{k}"][1] or 0) for k in ks]
            line = ax.errorbar(ks, m, yerr=e, marker="o", markersize=3, capsize=3, label=f"{label}: self-ensemble")
            ax.axhline(100 * summary[label]["finetuned"][0], color=line[0].get_color(), ls="--", lw=1,
                       label=f"{label}: fine-tuned, dense")
        ax.axhline(100 * summary["dense"]["finetuned"][0], color="black", lw=1.5, label="dense (+ same fine-tune)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(cfg.ensemble_k, labels=[str(k) for k in cfg.ensemble_k])
        ax.set_xlabel("subsampled passes averaged (K)")
        ax.set_ylabel(f"{split} accuracy (%)")
        ax.set_title("Self-ensembles and fine-tuned SSA against dense")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)

    plots.append(figure(ctx.out / "inference_modes.png", draw, size=(8, 5)))

    r = ctx.report
    r.h("SSA on images: subsampled training, dense fine-tune and self-ensembles", 1)
    r.p(f"Data {cfg.data}: {score.train_images} training images ({'flips' if cfg.augment else 'no augmentation'}), "
        f"scored on {score.labels.numel()} {split} images. ViT: patch {cfg.patch_size}, {cfg.n_layer} blocks, "
        f"d={cfg.d_model}, {cfg.n_head} heads; {cfg.steps} steps of {cfg.batch_size} images (AdamW lr {cfg.lr}, "
        f"cosine), then {ft_steps} dense steps at lr {cfg.finetune_lr}. SSA spread {cfg.spread}. Seeds "
        f"{cfg.seed}..{cfg.seed + cfg.n_seeds - 1}; mean ± standard error. Device {ctx.device}"
        f"{', quick run' if cfg.quick else ''}.")
    if overfit:
        r.p(f"Dense validation loss (mean over seeds) is lowest at step {overfit['min_step']} "
            f"({overfit['min_loss']:.4f}) and ends at {overfit['final_loss']:.4f}.")
    r.h("Accuracy (%), step time (ms) and peak memory (MB)", 2)
    r.p("`dense_eval`: the trained weights with full attention; `finetuned`: after the dense fine-tune; "
        "`ensemble_K<k>`: subsampling kept on, k passes' probabilities averaged. Step time: the trainer's mean "
        "wall time per optimizer step; peak: tensor memory of one training forward+backward.")
    r.p(markdown_table(table))
    r.h("The paper's claims", 2)
    r.p(markdown_table(claims))
    for p in plots:
        r.image(p, p.stem)
    r.save()
    return {"runs": rows, "summary": {k: {c: list(v) for c, v in s.items()} for k, s in summary.items()},
            "claims": claims, "dense_overfit": overfit, "finetune_steps": ft_steps}
