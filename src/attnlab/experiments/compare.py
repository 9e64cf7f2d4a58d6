"""Every registered mechanism (and transform) trained on the same small model and synthetic task."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..attention import AttentionSpec, kernels, transforms
from ..bench.memory import peak_memory
from ..models.lm import LM, LMConfig
from ..training import OptimConfig, TrainConfig, train
from ..tasks import SyntheticConfig, SyntheticTask
from .runner import ExperimentConfig, experiment, line_plot, markdown_table


@dataclass
class CompareConfig(ExperimentConfig):
    task: SyntheticConfig = field(default_factory=lambda: SyntheticConfig(kind="induction", vocab_size=32, seq_len=64))
    n_layer: int = 1  # one layer: only a key/value transform like KV shifting can form an induction head
    n_head: int = 4
    d_model: int = 64
    batch_size: int = 32
    steps: int = 1500
    eval_every: int = 100
    lr: float = 3e-3
    target_accuracy: float = 0.99  # early stop
    # Options per mechanism, chosen so that approximate mechanisms actually approximate at this length.
    options: dict[str, dict] = field(default_factory=lambda: {
        "ssa": {"factor": 2},
        "hyper": {"min_seq_len": 32, "block_size": 16, "sample_size": 16},
    })
    mechanisms: list[str] = field(default_factory=list)  # empty: every registered one
    transforms: bool = True  # also run every kernel with every registered key/value transform


def variants(cfg: CompareConfig) -> list[tuple[str, AttentionSpec]]:
    """Every kernel alone, then every kernel with every transform: transforms compose with any kernel."""
    names = cfg.mechanisms or sorted(kernels())
    tfs = ["none"] + (sorted(transforms()) if cfg.transforms else [])
    return [(n if t == "none" else f"{n}+{t}",
             AttentionSpec(name=n, options=dict(cfg.options.get(n, {})), transform=t,
                           transform_options=dict(cfg.options.get(t, {}))))
            for t in tfs for n in names]


@experiment("compare", CompareConfig, "train one small model per attention mechanism on the induction task")
def run(cfg: CompareConfig, ctx) -> dict:
    if cfg.quick:
        cfg = replace(cfg, steps=min(cfg.steps, 100), eval_every=50)
    rows, curves = [], {}
    for label, spec in variants(cfg):
        torch.manual_seed(cfg.seed)
        mcfg = LMConfig(vocab_size=cfg.task.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model,
                        max_seq_len=cfg.task.seq_len, attention=spec)
        model = LM(mcfg)
        task = SyntheticTask(cfg.task, cfg.batch_size, seed=cfg.seed)
        tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, eval_every=cfg.eval_every, log_every=10,
                           seed=cfg.seed, device=str(ctx.device), dtype=cfg.dtype, early_stop_metric="accuracy",
                           early_stop_value=cfg.target_accuracy, tensorboard=False)
        print(f"== {label}", flush=True)
        res = train(model, task, tcfg, OptimConfig(lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=50),
                    out_dir=ctx.out / "runs" / label)
        batch = task.batch(0, 0, 0, ctx.device)

        def step():
            model.train()
            task.loss(model, batch)[0].backward()
            model.zero_grad(set_to_none=True)

        _, peak = peak_memory(step, ctx.device)
        reached = next((e["step"] for e in res.evals if e["accuracy"] >= cfg.target_accuracy), None)
        rows.append({"mechanism": label, "accuracy": res.final["accuracy"], "loss": res.final["val_loss"],
                     "steps": res.steps, "steps_to_target": reached, "tokens_per_s": round(res.tokens_per_s),
                     "step_peak_mem_MB": round(peak / 2**20, 1), "params": model.num_params(non_embedding=False)})
        curves[label] = ([e["step"] for e in res.evals], [e["accuracy"] for e in res.evals])
    table = markdown_table(rows)
    print(table)
    ctx.write_csv("compare.csv", rows)
    plot = line_plot(ctx.out / "accuracy.png", curves, xlabel="step", ylabel="induction accuracy",
                     title="Induction accuracy by attention mechanism")
    r = ctx.report
    r.h("Attention mechanisms on the induction-head task", 1)
    r.p(f"Model: {cfg.n_layer} layer{'s' if cfg.n_layer > 1 else ''}, d={cfg.d_model}, {cfg.n_head} heads, rotary; task: {cfg.task.kind}, vocabulary "
        f"{cfg.task.vocab_size}, length {cfg.task.seq_len}; batch {cfg.batch_size}; at most {cfg.steps} steps, "
        f"early stop at {cfg.target_accuracy:.0%} accuracy. Device {ctx.device}. Peak memory is the tensor memory "
        "one training step allocates (see attnlab.bench.memory).")
    r.p(table)
    r.image(plot, "accuracy curves")
    r.save()
    return {"results": {row["mechanism"]: row for row in rows}}
