"""`attnlab run ssa --train_fraction F` (F < 1): SSA's claim in a data-limited regime.

The model trains on the first F of the corpus's training split for many steps, so dense validation loss turns
up; every variant (dense; SSA-unbiased and SSA-local at each S in `factors`, each followed by its dense
fine-tune) stops early on validation loss and is compared at its best evaluation (its weights restored there),
over `seeds` seeds. The fine-tune starts from the SSA model's best weights and is early-stopped likewise.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import replace

from ..bench.measure import mean_std
from ..errors import UserError
from ..models.lm import LM
from ..report import markdown_table
from ..run.config import with_train


class BestOnValidation:
    """A task wrapper that remembers the weights of the best validation loss seen so far and reports
    `evals_since_best`, which the trainer's early stop watches (stop once it reaches the patience)."""

    def __init__(self, task, model):
        self.task, self.model = task, model
        self.metrics = (*getattr(task, "metrics", ("val_loss",)), "evals_since_best")
        self.best_loss, self.best_state, self.since = float("inf"), None, 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def evaluate(self, model, device):
        m = self.task.evaluate(model, device)
        if m["val_loss"] < self.best_loss:
            self.best_loss, self.since = m["val_loss"], 0
            self.best_state = copy.deepcopy({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        else:
            self.since += 1
        return {**m, "evals_since_best": float(self.since)}

    def restore(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


def limited_variants(factors: list[int]) -> list[tuple[str, str, int]]:
    """(label, kind, S): dense and its own fine-tune, then per S ssa-unbiased, ssa-local and each one's dense
    fine-tune. dense+ft is the control: the fine-tune's lower learning rate helps any model that stopped
    early at a high one, so an SSA model's gain counts only beyond what the same fine-tune gives dense."""
    out = [("dense", "dense", 0), ("dense+ft", "dense+ft", 0)]
    for s in factors:
        for kind in ("ssa-unbiased", "ssa-local"):
            out += [(f"{kind} S={s}", kind, s), (f"{kind} S={s}+ft", kind + "+ft", s)]
    return out


def _train_best(ctx, run_cfg, name, model, corpus, tok, patience):
    from ..run.build import build_task

    task = build_task(run_cfg.data, model.cfg, run_cfg.train.batch_size, run_cfg.train.seed, tok, corpus=corpus)
    watched = BestOnValidation(task, model)
    if patience:
        run_cfg = with_train(run_cfg, early_stop_metric="evals_since_best", early_stop_value=float(patience),
                             early_stop_mode="max")
    _, _, res = ctx.train(run_cfg, name, model=model, task=watched, tokenizer=tok, corpus=corpus)
    watched.restore()
    best_step = next((e["step"] for e in res.evals if e["val_loss"] == watched.best_loss), None)
    return res, watched.best_loss, best_step


def run_limited(cfg, ctx) -> dict:
    from ..run.build import build
    from .ssa import base, finetune_run, variant_run

    if not 0 < cfg.train_fraction <= 1 or cfg.seeds < 1 or cfg.patience < 0:
        raise UserError("train_fraction must be in (0, 1], seeds at least 1 and patience at least 0")
    factors = cfg.factors or [cfg.factor]
    if any(s < 1 for s in factors):
        raise UserError("factors must be at least 1")
    data, tok, corpus = ctx.text(cfg.data, eval_batches=cfg.eval_batches)
    n_train = int(len(corpus.train) * cfg.train_fraction)
    if n_train < cfg.seq_len + 1:
        raise UserError(f"train_fraction {cfg.train_fraction} leaves {n_train} training tokens, fewer than one "
                        f"window of {cfg.seq_len}")
    corpus.train = corpus.train[:n_train]
    ft_steps = max(1, round(cfg.steps * cfg.finetune_fraction))

    rows = []
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        scfg = replace(cfg, seed=seed)
        models = {}
        for label, kind, s in limited_variants(factors):
            print(f"== seed {seed}: {label}", flush=True)
            vcfg = replace(scfg, factor=s or cfg.factor)
            if kind.endswith("+ft"):
                src = models[label[:-3]]
                model = LM(src.cfg)
                model.load_state_dict(src.state_dict())
                model.to(next(src.parameters()).device)
                run_cfg = finetune_run(base(vcfg, data), vcfg, ft_steps)
            else:
                run_cfg = variant_run(base(vcfg, data), vcfg, kind)
                model = build(run_cfg, corpus=corpus, tokenizer=tok).model
            name = f"seed{seed}-{label.replace(' ', '_').replace('=', '')}"
            res, best, best_step = _train_best(ctx, run_cfg, name, model, corpus, tok, cfg.patience)
            models[label] = model
            rows.append({"seed": seed, "variant": label, "best_val_loss": best, "best_step": best_step,
                         "steps": res.steps, "step_s": res.step_s, "stopped_early": res.stopped_early})
            print(f"   best val {best:.4f} at step {best_step}, {res.step_s:.3f} s/step", flush=True)
    return _write_limited(cfg, ctx, rows, factors, n_train, ft_steps)


def _write_limited(cfg, ctx, rows, factors, n_train, ft_steps) -> dict:
    ctx.report.csv("runs.csv", rows)
    table = []
    for label, _, _ in limited_variants(factors):
        sel = [r for r in rows if r["variant"] == label]
        m, s = mean_std([r["best_val_loss"] for r in sel])
        t, _ = mean_std([r["step_s"] for r in sel])
        table.append({"variant": label, "best_val_mean": m, "best_val_std": s, "step_s": t,
                      "best_step_mean": statistics.fmean(r["best_step"] or 0 for r in sel)})
    dense, dense_ft = table[0]["best_val_mean"], table[1]["best_val_mean"]
    for row in table:
        row["vs_dense_rel"] = (row["best_val_mean"] - dense) / dense
        row["vs_dense_ft_rel"] = (row["best_val_mean"] - dense_ft) / dense_ft
    ssa_ft = [r for r in table[2:] if r["variant"].endswith("+ft")]
    claims = {**{f"{r['variant']} matches (within 1 %) or beats dense": r["vs_dense_rel"] <= 0.01 for r in ssa_ft},
              **{f"{r['variant']} beats dense+ft (the same fine-tune given to dense)": r["vs_dense_ft_rel"] < 0
                 for r in ssa_ft}}
    r = ctx.report
    r.h("SSA in a data-limited regime", 1)
    r.p(f"Corpus {cfg.data}: the first {cfg.train_fraction:.0%} of its training split ({n_train} tokens), "
        f"validation on {cfg.eval_batches} batches × {cfg.batch_size} × {cfg.seq_len} held-out tokens. Model: "
        f"{cfg.n_layer} layers, d={cfg.d_model}, {cfg.n_head} heads; up to {cfg.steps} steps (lr {cfg.lr}), "
        f"evaluated every {cfg.eval_every}; early stop after {cfg.patience or 'no'} evaluations without a new "
        f"best, weights restored to the best. Dense fine-tunes: up to {ft_steps} steps at lr {cfg.finetune_lr} from "
        f"each model's best weights (dense+ft: the dense model's, the control). Seeds {cfg.seed}..{cfg.seed + cfg.seeds - 1}. Device {ctx.device}.")
    r.h("Best validation loss per variant (mean ± std over seeds)", 2)
    r.table(table, ["variant", "best_val_mean", "best_val_std", "vs_dense_rel", "vs_dense_ft_rel", "best_step_mean",
                   "step_s"],
            fmt="{:.4f}")
    r.p(markdown_table([{"claim": k, "result": v} for k, v in claims.items()]))
    r.save()
    return {"mode": "data-limited", "train_tokens": n_train, "table": table, "runs": rows, "claims": claims}
