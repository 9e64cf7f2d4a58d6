"""Every registered mechanism (and transform) trained on the same small model and synthetic task."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..attention import AttentionSpec, kernels, transforms
from ..bench.memory import training_step_peak
from ..report import line_plot, markdown_table
from ..run.config import DataConfig, RunConfig, lm_run, with_attention
from ..run.experiment import ExperimentConfig, experiment
from ..tasks import SyntheticConfig


@dataclass
class CompareConfig(ExperimentConfig):
    task: SyntheticConfig = field(default_factory=lambda: SyntheticConfig(kind="induction", vocab_size=32, seq_len=64))
    """the synthetic task every mechanism is trained on"""
    n_layer: int = 1
    """layers; with one, only a key/value transform like KV shifting can form an induction head"""
    n_head: int = 4
    """attention heads"""
    d_model: int = 64
    """model width"""
    batch_size: int = 32
    """sequences per step"""
    steps: int = 1500
    """at most this many steps per mechanism"""
    eval_every: int = 100
    """steps between evaluations"""
    lr: float = 3e-3
    """peak learning rate (AdamW, warmup 50, cosine to lr/10)"""
    target_accuracy: float = 0.99
    """stop a run once its accuracy reaches this"""
    options: dict[str, dict] = field(default_factory=lambda: {
        "ssa": {"factor": 2},
        "hyper": {"min_seq_len": 32, "block_size": 16, "sample_size": 16},
    })
    """options per mechanism or transform, chosen so that approximate mechanisms approximate at this length"""
    mechanisms: list[str] = field(default_factory=list)
    """kernels to run; empty: every registered causal one that is not an analysis tool"""
    transforms: bool = True
    """also run every kernel with every registered key/value transform"""


def base(cfg: CompareConfig) -> RunConfig:
    return lm_run(vocab_size=cfg.task.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model,
                  seq_len=cfg.task.seq_len, batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr, warmup_steps=50,
                  eval_every=cfg.eval_every, seed=cfg.seed, early_stop_metric="accuracy",
                  early_stop_value=cfg.target_accuracy, keep_checkpoints=3, progress=True,
                  data=DataConfig(source=cfg.task.kind, num_kv_pairs=cfg.task.num_kv_pairs,
                                  eval_batches=cfg.task.eval_batches))


def variants(cfg: CompareConfig) -> dict[str, AttentionSpec]:
    """Every kernel alone, then every kernel with every transform: transforms compose with any kernel."""
    # An LM task wants causal kernels; analysis kernels (dense cost, for studying a trained model) are left out.
    names = cfg.mechanisms or sorted(n for n, e in kernels().items() if e.caps.causal and not e.caps.analysis)
    tfs = ["none"] + (sorted(transforms()) if cfg.transforms else [])
    return {(n if t == "none" else f"{n}+{t}"): AttentionSpec(name=n, options=dict(cfg.options.get(n, {})), transform=t,
                                                              transform_options=dict(cfg.options.get(t, {})))
            for t in tfs for n in names}


@experiment("compare", CompareConfig, "train one small model per attention mechanism on the induction task")
def run(cfg: CompareConfig, ctx) -> dict:
    if cfg.quick:
        cfg = replace(cfg, steps=min(cfg.steps, 100), eval_every=50)
    rows, curves = [], {}
    for label, spec in variants(cfg).items():
        print(f"== {label}", flush=True)
        model, task, res = ctx.train(with_attention(base(cfg), **vars(spec)), label)
        peak = training_step_peak(model, task, ctx.device)
        reached = next((e["step"] for e in res.evals if e["accuracy"] >= cfg.target_accuracy), None)
        rows.append({"mechanism": label, "accuracy": res.final["accuracy"], "loss": res.final["val_loss"],
                     "steps": res.steps, "steps_to_target": reached, "tokens_per_s": round(res.tokens_per_s),
                     "step_peak_mem_MB": round(peak, 1), "params": model.num_params(non_embedding=False)})
        curves[label] = ([e["step"] for e in res.evals], [e["accuracy"] for e in res.evals])
    table = markdown_table(rows)
    print(table)
    ctx.report.csv("compare.csv", rows)
    plot = line_plot(ctx.out / "accuracy.png", curves, xlabel="step", ylabel="induction accuracy",
                     title="Induction accuracy by attention mechanism")
    r = ctx.report
    r.h("Attention mechanisms on the induction-head task", 1)
    r.p(f"Model: {cfg.n_layer} layer{'s' if cfg.n_layer > 1 else ''}, d={cfg.d_model}, {cfg.n_head} heads, rotary; task: "
        f"{cfg.task.kind}, vocabulary {cfg.task.vocab_size}, length {cfg.task.seq_len}; batch {cfg.batch_size}; at most "
        f"{cfg.steps} steps, early stop at {cfg.target_accuracy:.0%} accuracy. Device {ctx.device}. Peak memory is the "
        "tensor memory one training step allocates (see attnlab.bench.memory).")
    r.p(table)
    r.image(plot, "accuracy curves")
    r.save()
    return {"results": {row["mechanism"]: row for row in rows}}
