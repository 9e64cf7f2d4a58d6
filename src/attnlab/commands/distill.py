"""`attnlab distill`: train a student LM against a teacher run's output distribution (KL at temperature T plus
the usual cross-entropy). Same trainer, checkpoints, resume and progress bar as `attnlab train`; the student
is an ordinary LM run that `attnlab eval/generate/quantize` take as it is."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass, replace

from ..errors import UserError
from ..run.config import RunConfig


@dataclass
class Config(RunConfig):
    """A student LM (any mechanism and transform) distilled from a teacher run sharing its tokenizer."""

    out: str = "runs/distill"
    """the student's run folder: checkpoints, metrics.jsonl, TensorBoard events, tokenizer"""
    teacher: str = ""
    """the teacher: an attnlab language-model run folder or checkpoint (required)"""
    alpha: float = 0.5
    """weight of the KL term; 1 − alpha weighs the cross-entropy against the labels"""
    temperature: float = 2.0
    """softmax temperature of both distributions in the KL term"""
    top_k: int = 0
    """0: the teacher's whole distribution, computed on the fly; k > 0: its k most likely tokens only"""
    teacher_cache: str = ""
    """a folder to cache the teacher's top-k log-probabilities in (k·6 bytes per token; needs top_k > 0)"""

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise UserError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise UserError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0: the whole distribution), got {self.top_k}")
        if self.teacher_cache and not self.top_k:
            raise UserError("teacher_cache stores top-k log-probabilities: give top_k > 0 as well")


def load_teacher(path):
    from ..run.load import load_run

    teacher = load_run(path)
    if teacher.kind != "lm":
        raise UserError(f"the teacher must be a language-model run; {teacher.ckpt} is a {teacher.kind!r} run")
    return teacher


def _same_tokenizer(a, b, text: str) -> bool:
    return a.vocab_size == b.vocab_size and a.encode(text) == b.encode(text)


def student_data(cfg: Config, teacher):
    """The student's data config and tokenizer: the teacher's unless --data.path names other text, in which
    case its tokenizer must encode that text exactly as the teacher's does."""
    if not cfg.data.path:
        if teacher.tokenizer is None:
            raise UserError("the teacher was trained on a synthetic task; give the student's data (--data.*)")
        return teacher.data, teacher.tokenizer
    from ..data.text import read_text
    from ..run.build import tokenizer_for

    tok = tokenizer_for(cfg.data, None)
    if teacher.tokenizer is None or not _same_tokenizer(tok, teacher.tokenizer, read_text(cfg.data.path)[:20000]):
        raise UserError(f"the teacher's vocabulary ({teacher.model.cfg.vocab_size} tokens, "
                        f"{getattr(teacher.tokenizer, 'name', 'none')}) differs from the student's "
                        f"({tok.vocab_size}, {tok.name}); distil with the teacher's tokenizer")
    return cfg.data, teacher.tokenizer


def main(cfg: Config) -> dict:
    from ..run.build import build
    from ..tasks.distill import BYTES_PER_CACHED_TOKEN, DistillTask
    from ..training import claim_run_dir, distributed, is_main, train
    from ..training.checkpoint import list_checkpoints

    if not cfg.teacher:
        raise UserError("--teacher is required (an attnlab language-model run)")
    teacher = load_teacher(cfg.teacher)
    if teacher.record.get("quantized"):
        raise UserError(f"{teacher.ckpt} is quantised; distil from the fp32 run it came from")
    data, tok = student_data(cfg, teacher)
    out = claim_run_dir(cfg.out, cfg.train.resume)
    try:
        if is_main() and not (out / "tokenizer").is_dir():
            tok.save(out / "tokenizer")
        run_cfg = RunConfig(out=cfg.out, task="lm", model=cfg.model, data=data, train=cfg.train, optim=cfg.optim)
        built = build(run_cfg, out, fresh=False, tokenizer=tok)
        model = built.model
        if model.cfg.max_seq_len > teacher.model.cfg.max_seq_len:
            raise UserError(f"the student's max_seq_len ({model.cfg.max_seq_len}) is longer than its teacher's "
                            f"({teacher.model.cfg.max_seq_len}): the teacher cannot score its windows")
        n_s, n_t = model.num_params(non_embedding=False), teacher.model.num_params(non_embedding=False)
        if is_main():
            if n_s > n_t:
                print(f"attnlab: note: the student ({n_s:,} parameters) is larger than its teacher ({n_t:,})",
                      file=sys.stderr)
            print(f"student: {n_s:,} parameters; teacher: {n_t:,}")
            if cfg.top_k:
                per_step = cfg.train.batch_size * cfg.train.grad_accum * built.config.model.max_seq_len
                print(f"teacher top-{cfg.top_k} log-probs: {cfg.top_k * BYTES_PER_CACHED_TOKEN} bytes per token, "
                      f"{per_step * cfg.top_k * BYTES_PER_CACHED_TOKEN / 2**20:.2f} MiB per step"
                      + (f", cached in {cfg.teacher_cache}" if cfg.teacher_cache else ""))
        task = DistillTask(built.task, teacher.model, alpha=cfg.alpha, temperature=cfg.temperature,
                           top_k=cfg.top_k, cache_dir=cfg.teacher_cache or None)
        distill = {"teacher": str(teacher.ckpt), "alpha": cfg.alpha, "temperature": cfg.temperature,
                   "top_k": cfg.top_k}
        res = train(model, task, cfg.train, cfg.optim, out_dir=out,
                    run_config={"task": "lm", "model": asdict(built.config.model), "data": asdict(data),
                                "distill": distill})
        summary = {"steps": res.steps, "tokens_per_s": res.tokens_per_s, "step_s": res.step_s,
                   "student_params": n_s, "teacher_params": n_t, **res.final}
        if is_main():
            (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
            print(json.dumps(summary, indent=2))
        return summary
    except Exception:
        if not cfg.train.resume and is_main() and not list_checkpoints(out):
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        distributed.teardown()
