"""KV shifting on the induction-head task (and multi-query associative recall): the paper's toy claim.

One layer of KV-shift attention can represent an induction head (key i carries token i−1, value i carries
token i), where vanilla attention needs a second layer to move the previous token into position first. The
experiment trains 1- and 2-layer models of both kinds, same initial weights and batches, until 99 % accuracy
or the step limit, and reports steps-to-target, final accuracy and the accuracy curves.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from ..errors import UserError
from ..report import line_plot, markdown_table
from ..run.config import DataConfig, RunConfig, lm_run, with_attention
from ..run.experiment import ExperimentConfig, experiment
from ..run.inspect import shift_coefficients


@dataclass
class InductionConfig(ExperimentConfig):
    tasks: list[Literal["induction", "mqar"]] = field(default_factory=lambda: ["induction", "mqar"])
    """synthetic tasks to run: induction, mqar"""
    layers: list[int] = field(default_factory=lambda: [1, 2])
    """layer counts to compare"""
    vocab_size: int = 128
    """vocabulary size of the synthetic tasks"""
    seq_len: int = 128
    """sequence length"""
    mqar_kv_pairs: int = 16
    """key-value pairs per MQAR sequence"""
    d_model: int = 128
    """model width"""
    n_head: int = 4
    """attention heads per layer"""
    batch_size: int = 32
    """sequences per step"""
    lr: float = 1e-3
    """peak learning rate (AdamW, cosine decay to lr/10)"""
    warmup_steps: int = 100
    """linear learning-rate warm-up steps"""
    max_steps: int = 3000
    """at most this many training steps per run"""
    target_accuracy: float = 0.99
    """early stop"""
    eval_every: int = 50
    """steps between evaluations"""
    eval_batches: int = 4
    """held-out batches per evaluation"""
    kv_shift: dict = field(default_factory=dict)
    """options of the KV-shift models (see `attnlab list`)"""


def _claims(rows: list[dict], target: float) -> list[str]:
    """The paper's toy claims, checked against this run's induction rows."""
    ind = {(r["variant"], r["layers"]): r for r in rows if r["task"] == "induction"}
    out = []
    ks1, va1, va2 = ind.get(("kv_shift", 1)), ind.get(("vanilla", 1)), ind.get(("vanilla", 2))
    if ks1:
        ok = ks1["steps_to_target"] is not None and ks1["steps_to_target"] <= 500
        out.append(f"1-layer KV-shift reaches {target:.0%} within 500 steps: {'yes' if ok else 'NO'} "
                   f"(step {ks1['steps_to_target']}, final {ks1['final_accuracy']:.1%})")
    if va1:
        ok = va1["best_accuracy"] <= 0.10
        out.append(f"1-layer vanilla stays at or below 10 %: {'yes' if ok else 'NO'} "
                   f"(best {va1['best_accuracy']:.1%}, final {va1['final_accuracy']:.1%} after {va1['steps']} steps)")
    if va2:
        reached = va2["steps_to_target"]
        out.append("2-layer vanilla: " + (f"reaches {target:.0%} at step {reached}" if reached is not None else
                                          f"does not reach {target:.0%} in {va2['steps']} steps "
                                          f"(final {va2['final_accuracy']:.1%})"))
    return out


def base(cfg: InductionConfig, task: str, n_layer: int) -> RunConfig:
    return lm_run(vocab_size=cfg.vocab_size, n_layer=n_layer, n_head=cfg.n_head, d_model=cfg.d_model,
                  seq_len=cfg.seq_len, batch_size=cfg.batch_size, steps=cfg.max_steps, lr=cfg.lr,
                  warmup_steps=cfg.warmup_steps, eval_every=cfg.eval_every, seed=cfg.seed, log_every=25,
                  early_stop_metric="accuracy", early_stop_value=cfg.target_accuracy,
                  data=DataConfig(source=task, num_kv_pairs=cfg.mqar_kv_pairs, eval_batches=cfg.eval_batches))


def variant_run(base_cfg: RunConfig, variant: str, kv_shift: dict) -> RunConfig:
    if variant == "vanilla":
        return base_cfg
    return with_attention(base_cfg, transform="kv_shift", transform_options=dict(kv_shift))


@experiment("induction", InductionConfig, "1- and 2-layer vanilla vs KV-shift on induction heads and MQAR")
def run(cfg: InductionConfig, ctx) -> dict:
    if cfg.quick:
        cfg = replace(cfg, layers=[1], vocab_size=min(cfg.vocab_size, 64), seq_len=min(cfg.seq_len, 64),
                      mqar_kv_pairs=min(cfg.mqar_kv_pairs, 8), d_model=min(cfg.d_model, 64),
                      max_steps=min(cfg.max_steps, 300), eval_every=25, eval_batches=2, warmup_steps=25)
    if not cfg.tasks or not cfg.layers or min(cfg.layers) < 1:
        raise UserError("induction needs at least one task and positive layer counts")
    rows, curves, coefs = [], {}, {}
    for task_name in cfg.tasks:
        curves[task_name] = {}
        for n_layer in cfg.layers:
            for variant in ("vanilla", "kv_shift"):
                label = f"{variant}-{n_layer}L"
                print(f"== {task_name} {label}", flush=True)
                model, _, res = ctx.train(variant_run(base(cfg, task_name, n_layer), variant, cfg.kv_shift),
                                          f"{task_name}-{label}", paired=True)
                accs = [e["accuracy"] for e in res.evals]
                reached = next((e["step"] for e in res.evals if e["accuracy"] >= cfg.target_accuracy), None)
                rows.append({"task": task_name, "model": label, "variant": variant, "layers": n_layer,
                             "steps_to_target": reached, "final_accuracy": accs[-1], "best_accuracy": max(accs),
                             "steps": res.steps, "params": model.num_params(non_embedding=False),
                             "wall_s": round(res.wall_s, 1)})
                curves[task_name][label] = ([e["step"] for e in res.evals], accs)
                if variant == "kv_shift":
                    coefs[f"{task_name}-{label}"] = shift_coefficients(model)
                print(f"   steps to {cfg.target_accuracy:.0%}: {reached}; final accuracy {accs[-1]:.4f}", flush=True)

    ctx.report.csv("results.csv", rows)
    ctx.report.jsonl("curves.jsonl", [{"task": t, "model": m, "step": s, "accuracy": a}
                                     for t, by in curves.items() for m, (xs, ys) in by.items()
                                     for s, a in zip(xs, ys)])
    claims = _claims(rows, cfg.target_accuracy)
    r = ctx.report
    r.h("KV shifting on induction heads and associative recall", 1)
    r.p(f"Models: d={cfg.d_model}, {cfg.n_head} heads, rotary, layers {cfg.layers}; vanilla and KV-shift "
        f"(options {cfg.kv_shift or 'paper defaults'}) start from the same weights. Data: vocabulary {cfg.vocab_size}, "
        f"length {cfg.seq_len}, batch {cfg.batch_size}; MQAR with {cfg.mqar_kv_pairs} key-value pairs. AdamW lr "
        f"{cfg.lr} (warmup {cfg.warmup_steps}, cosine), at most {cfg.max_steps} steps, evaluation every "
        f"{cfg.eval_every} steps on {cfg.eval_batches} held-out batches, early stop at {cfg.target_accuracy:.0%}. "
        f"Accuracy counts only the scored (recall) positions. Device {ctx.device}.")
    if claims:
        r.h("Claims", 2)
        if cfg.quick:
            r.p("This is a --quick run (smaller model, fewer steps): the claims are about the full run.")
        r.p("\n".join(f"- {c}" for c in claims))
    r.table(rows, ["task", "model", "steps_to_target", "final_accuracy", "best_accuracy", "steps", "params", "wall_s"])
    plots = {}
    for task_name, by in curves.items():
        plots[task_name] = line_plot(ctx.out / f"{task_name}_accuracy.png", by, xlabel="step", ylabel="accuracy",
                                     title=f"{task_name}: vanilla vs KV-shift")
        r.image(plots[task_name], f"{task_name} accuracy")
    if coefs:
        r.h("Learned shift weights of the KV-shift models", 2)
        r.p("alpha_0/alpha_1 weigh a key's own / previous projection, beta_0/beta_1 a value's. An exact induction "
            "head needs, in some head, alpha ≈ (0, 1) and beta ≈ (1, 0).")
        for name, cr in coefs.items():
            r.p(f"**{name}**\n\n" + markdown_table(cr, fmt="{:.3f}"))
    r.save()
    for line in claims:
        print(line)
    return {"results": rows, "claims": claims, "coefficients": coefs,
            "plots": [str(p.name) for p in plots.values()]}
