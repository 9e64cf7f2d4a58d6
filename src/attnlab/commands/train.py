"""`attnlab train`: train a decoder LM; the run folder gets checkpoints, metrics.jsonl, TensorBoard events and
the tokenizer, and `train_summary.json` at the end."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..run.config import RunConfig as Config


def main(cfg: Config) -> dict:
    from ..run.build import build
    from ..training import train

    out = Path(cfg.out)
    if out.exists() and (out / "checkpoints").exists() and not cfg.train.resume:
        from ..errors import UserError

        raise UserError(f"{out} already holds a run; pass --train.resume true to continue it, or choose another --out")
    built = build(cfg, out, fresh=not cfg.train.resume)
    model, cfg = built.model, built.config
    print(f"model: {model.num_params():,} parameters (non-embedding), "
          f"{model.flops_per_token() / 1e6:.2f} MFLOPs/token for training")
    res = train(model, built.task, cfg.train, cfg.optim, out_dir=out,
                run_config={"model": asdict(cfg.model), "data": asdict(cfg.data)})
    summary = {"steps": res.steps, "tokens_per_s": res.tokens_per_s, "step_s": res.step_s, **res.final}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary
