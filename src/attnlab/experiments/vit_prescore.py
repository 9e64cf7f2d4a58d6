"""Pre-scored attention on images: how many keys per query a ViT needs, chosen by which method.

A ViT with patch 2 on 28×28 images (196 patches + the class token: the token count of a ViT-B/16 at 224) is
trained with exact attention. At evaluation every block's attention is swapped for `topkeys`: each query
attends exactly to a budget of keys per (image, head), chosen by k-means or k-median clustering (sampled ∝
distance from the centroid, as "Efficient Attention via Pre-Scoring" does), by leverage score or ‖k‖² (top,
as LevAttention does), or uniformly at random (the control), for budgets from 8 to every key. One more model
is trained from scratch with one method and budget in every block and compared with swapping the same
selection into the exact-trained model (LevAttention's finding: training with the selection does much better).

Each seed trains its own models and draws its own selections; figures are means over seeds with standard
errors. The headline per method: the smallest budget that keeps >= keep_fraction of the exact accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..attention.swap import swapped_attention
from ..attention.topkeys import METHODS
from ..errors import UserError
from ..report import figure, markdown_table
from ..run.experiment import ExperimentConfig, experiment
from .vit_runs import mean_se, pm, quick, setup, train_vit, with_vit_attention


@dataclass
class PrescoreViTConfig(ExperimentConfig):
    data: str = ""
    """a folder of IDX files (Fashion-MNIST: /usr/share/datasets/fashion-mnist) or of class sub-folders"""
    limit_train: int = 0
    """train on a random subset of this many images (0: all)"""
    eval_images: int = 1000
    """test images (validation where the data has no test split) scored per evaluation; 0: all"""
    patch_size: int = 2
    """patch side: 2 on 28×28 gives 196 patches + the class token"""
    d_model: int = 64
    """ViT width"""
    n_layer: int = 4
    """ViT blocks (every one is swapped)"""
    n_head: int = 4
    """attention heads"""
    batch_size: int = 64
    """training images per step"""
    steps: int = 800
    """training steps of each model"""
    lr: float = 2e-3
    """peak learning rate (AdamW, cosine decay to lr/100)"""
    warmup_steps: int = 100
    """linear warm-up steps"""
    eval_every: int = 0
    """validation during training every this many steps (0: none)"""
    n_seeds: int = 3
    """seeds seed, seed+1, ...: each trains its models and draws its selections"""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """selection methods swept: kmeans, kmedian, leverage, norm, random"""
    budgets: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 197])
    """keys per query; a budget of at least the token count is exact attention"""
    clusters: int = 4
    """k-means / k-median clusters per (image, head)"""
    iters: int | None = None
    """Lloyd rounds (null: 10 for k-means, 3 for k-median)"""
    layers: str = "all"
    """the blocks whose attention is swapped (all, last:N, ...)"""
    scratch_method: str = "leverage"
    """method of the model trained with the selection from scratch ("" skips it)"""
    scratch_budget: int = 32
    """its budget"""
    keep_fraction: float = 0.95
    """a method "keeps" the model at the smallest budget whose accuracy is at least this share of exact"""


def topkeys_options(cfg: PrescoreViTConfig, method: str, budget: int) -> dict:
    return {"method": method, "budget": budget, "clusters": cfg.clusters, "iters": cfg.iters}


def _check(cfg: PrescoreViTConfig) -> None:
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise UserError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    if not cfg.budgets or min(cfg.budgets) < 1:
        raise UserError("budgets must list key counts of at least 1")
    if cfg.scratch_method and cfg.scratch_method not in METHODS:
        raise UserError(f"scratch_method must be one of {', '.join(METHODS)} or empty, got {cfg.scratch_method!r}")
    if cfg.n_seeds < 1 or not 0 < cfg.keep_fraction <= 1:
        raise UserError("n_seeds must be at least 1 and keep_fraction in (0, 1]")


@experiment("vit-prescore", PrescoreViTConfig,
            "ViT on images: accuracy against a key budget per pre-scoring method (k-means, k-median, leverage, norm, "
            "random); a model trained with the selection")
def run(cfg: PrescoreViTConfig, ctx) -> dict:
    if cfg.quick:
        cfg = quick(cfg, steps=40, eval_every=0)
    _check(cfg)
    prep = setup(cfg, ctx, "vit-prescore", augment=True, flip=True, crop_padding=0)
    data, score = prep.data, prep.score
    rows, scratch_rows = [], []
    n_tokens = None
    for seed in range(cfg.seed, cfg.seed + cfg.n_seeds):
        base = prep.base(seed)
        print(f"== exact, seed {seed}", flush=True)
        model, _, res = train_vit(ctx, base, data, f"exact-s{seed}")
        n_tokens = model.cfg.seq_len
        exact = score(model)
        rows.append({"seed": seed, "method": "exact", "budget": n_tokens, **exact, "train_s": res.wall_s})
        print(f"   exact: accuracy {exact['accuracy']:.4f}", flush=True)
        budgets = sorted({min(b, n_tokens) for b in cfg.budgets})
        for method in cfg.methods:
            for budget in budgets:
                if budget >= n_tokens:  # every key: the exact model itself
                    rows.append({"seed": seed, "method": method, "budget": n_tokens, **exact})
                    continue
                with swapped_attention(model, "topkeys", topkeys_options(cfg, method, budget), cfg.layers,
                                       need={"noncausal": True}):
                    r = score(model, seed=seed)
                rows.append({"seed": seed, "method": method, "budget": budget, **r})
            print(f"   {method}: " + ", ".join(f"{r['budget']}:{r['accuracy']:.3f}" for r in rows
                                            if r["seed"] == seed and r["method"] == method), flush=True)
        if cfg.scratch_method:
            scratch_rows += _scratch(cfg, ctx, base, data, model, score, seed, exact)
    return _write(cfg, ctx, rows, scratch_rows, n_tokens, prep.split, score)


def _scratch(cfg, ctx, base, data, exact_model, score, seed, exact) -> list[dict]:
    """The selection in every block from the first step, against the same selection swapped into the exact
    model (LevAttention, section on training from scratch)."""
    opts = topkeys_options(cfg, cfg.scratch_method, cfg.scratch_budget)
    print(f"== trained with {cfg.scratch_method} @ {cfg.scratch_budget}, seed {seed}", flush=True)
    model, _, res = train_vit(ctx, with_vit_attention(base, "topkeys", opts), data, f"scratch-s{seed}")
    with swapped_attention(exact_model, "topkeys", opts, cfg.layers, need={"noncausal": True}):
        swapped = score(exact_model, seed=seed)
    own = score(model, seed=seed)
    dense = score(model, mode="dense")
    out = [{"seed": seed, "model": "exact-trained", "eval": "exact", **exact},
           {"seed": seed, "model": "exact-trained", "eval": "selection swapped in", **swapped},
           {"seed": seed, "model": "trained with the selection", "eval": "selection", **own, "train_s": res.wall_s},
           {"seed": seed, "model": "trained with the selection", "eval": "exact", **dense}]
    print(f"   swapped {swapped['accuracy']:.4f}, trained with it {own['accuracy']:.4f}", flush=True)
    return out


def _summary(rows, key_fields):
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in key_fields), []).append(r)
    out = []
    for key, rs in groups.items():
        acc, acc_se = mean_se([r["accuracy"] for r in rs])
        loss, loss_se = mean_se([r["loss"] for r in rs])
        out.append({**dict(zip(key_fields, key)), "accuracy": acc, "accuracy_se": acc_se, "loss": loss,
                    "loss_se": loss_se, "seeds": len(rs)})
    return out


def _write(cfg, ctx, rows, scratch_rows, n_tokens, split, score) -> dict:
    ctx.report.csv("evals.csv", rows)
    exact = next(s for s in _summary([r for r in rows if r["method"] == "exact"], ["method"]))
    table = _summary([r for r in rows if r["method"] != "exact"], ["method", "budget"])
    threshold = cfg.keep_fraction * exact["accuracy"]
    keeps = {}
    for m in cfg.methods:
        ok = [s["budget"] for s in table if s["method"] == m and s["accuracy"] >= threshold]
        keeps[m] = min(ok) if ok else None
    budgets = sorted({s["budget"] for s in table})
    wide = [{"budget": b, **{m: pm(*next(((s["accuracy"], s["accuracy_se"]) for s in table
                                          if s["method"] == m and s["budget"] == b), (None, None)))
                             for m in cfg.methods}} for b in budgets]
    ctx.report.csv("accuracy_by_budget.csv", table)

    def draw(fig, plt):
        ax = fig.add_subplot(1, 1, 1)
        for m in cfg.methods:
            ss = [s for s in table if s["method"] == m]
            ax.errorbar([s["budget"] for s in ss], [100 * s["accuracy"] for s in ss],
                        yerr=[100 * (s["accuracy_se"] or 0) for s in ss], marker="o", markersize=3, capsize=3, label=m)
        ax.axhline(100 * exact["accuracy"], color="black", lw=1, label="exact attention")
        ax.axhline(100 * threshold, color="gray", ls="--", lw=1, label=f"{cfg.keep_fraction:.0%} of exact")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, labels=[str(b) for b in budgets])
        ax.set_xlabel(f"keys per query (of {n_tokens})")
        ax.set_ylabel(f"{split} accuracy (%)")
        ax.set_title(f"Pre-scored attention swapped into an exact-trained ViT ({cfg.n_seeds} seed(s), ± s.e.)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)

    plot = figure(ctx.out / "accuracy_vs_budget.png", draw)
    scratch = _summary(scratch_rows, ["model", "eval"]) if scratch_rows else []
    if scratch_rows:
        ctx.report.csv("scratch.csv", scratch_rows)

    r = ctx.report
    r.h("Pre-scored attention on images", 1)
    r.p(f"Data {cfg.data} ({score.train_images} training images); "
        f"scored on {score.labels.numel()} {split} images. ViT: patch {cfg.patch_size} ({n_tokens} tokens), "
        f"{cfg.n_layer} blocks, d={cfg.d_model}, {cfg.n_head} heads; {cfg.steps} steps of {cfg.batch_size} images, "
        f"AdamW lr {cfg.lr}. Swapped blocks: {cfg.layers}. k-means/k-median: {cfg.clusters} clusters, "
        f"{cfg.iters or '10 (k-means) / 3 (k-median)'} Lloyd rounds, keys sampled ∝ distance to their centroid; "
        f"leverage and norm: top scores; random: uniform. "
        f"Seeds {cfg.seed}..{cfg.seed + cfg.n_seeds - 1} (each its own model and draws); mean ± standard error. "
        f"Device {ctx.device}{', quick run' if cfg.quick else ''}.")
    r.p(f"Exact attention: {pm(exact['accuracy'], exact['accuracy_se'])} % accuracy.")
    r.h("Accuracy (%) against the key budget", 2)
    r.p(markdown_table(wide))
    r.h(f"Smallest budget keeping ≥ {cfg.keep_fraction:.0%} of the exact accuracy", 2)
    r.p(markdown_table([{"method": m, "budget": keeps[m] if keeps[m] is not None else f"> {max(budgets)}"}
                        for m in cfg.methods]))
    if scratch:
        r.h(f"Trained with the selection vs swapped in ({cfg.scratch_method}, {cfg.scratch_budget} keys)", 2)
        r.p(markdown_table([{"model": s["model"], "evaluated with": s["eval"],
                             "accuracy (%)": pm(s["accuracy"], s["accuracy_se"]),
                             "loss": pm(s["loss"], s["loss_se"], scale=1, digits=4)} for s in scratch]))
    r.image(plot, plot.stem)
    r.save()
    return {"exact_accuracy": exact, "accuracy_by_budget": table, "budget_keeping": keeps, "scratch": scratch,
            "tokens": n_tokens}
