"""`attnlab train`: train a model of the kind `--task` names (default lm: a decoder LM); the run folder gets
checkpoints, metrics.jsonl, TensorBoard events, the tokenizer if any, and `train_summary.json` at the end.
Under torchrun every rank trains and only rank 0 writes and prints."""

from __future__ import annotations

import json
import shutil


def config_class(argv: list[str]) -> type:
    from ..run.kinds import kind, task_of

    return kind(task_of(argv)).config_cls


def main(cfg) -> dict:
    from ..run.build import run_record
    from ..run.kinds import kind
    from ..training import claim_run_dir, distributed, is_main, train
    from ..training.checkpoint import list_checkpoints

    out = claim_run_dir(cfg.out, cfg.train.resume)  # before anything is written: a run folder has one owner
    try:
        built = kind(cfg.task).build(cfg, out, fresh=not cfg.train.resume)
        model, cfg = built.model, built.config
        if is_main():
            print(f"model: {model.num_params():,} parameters")
        res = train(model, built.task, cfg.train, cfg.optim, out_dir=out, run_config=run_record(cfg))
        summary = {"steps": res.steps, "tokens_per_s": res.tokens_per_s, "step_s": res.step_s, **res.final}
        if is_main():
            (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
            print(json.dumps(summary, indent=2))
        return summary
    except Exception:
        # A new run that failed before its first checkpoint leaves nothing behind: the folder was empty or absent.
        if not cfg.train.resume and is_main() and not list_checkpoints(out):
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        distributed.teardown()
