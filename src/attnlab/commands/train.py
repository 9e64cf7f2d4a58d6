"""`attnlab train`: train a model of the kind `--task` names (default lm: a decoder LM); the run folder gets
checkpoints, metrics.jsonl, TensorBoard events, the tokenizer if any, and `train_summary.json` at the end."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path


def config_class(argv: list[str]) -> type:
    from ..run.kinds import kind, task_of

    return kind(task_of(argv)).config_cls


def main(cfg) -> dict:
    from ..errors import UserError
    from ..run.kinds import kind
    from ..training import train

    out = Path(cfg.out)
    if out.exists() and (out / "checkpoints").exists() and not cfg.train.resume:
        raise UserError(f"{out} already holds a run; pass --train.resume true to continue it, or choose another --out")
    built = kind(cfg.task).build(cfg, out, fresh=not cfg.train.resume)
    model, cfg = built.model, built.config
    print(f"model: {model.num_params():,} parameters")
    res = train(model, built.task, cfg.train, cfg.optim, out_dir=out,
                run_config={"task": cfg.task, "model": asdict(cfg.model), "data": asdict(cfg.data)})
    summary = {"steps": res.steps, "tokens_per_s": res.tokens_per_s, "step_s": res.step_s, **res.final}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary
