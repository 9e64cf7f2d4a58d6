"""`attnlab distill`: train a student LM against a teacher's output distribution (KL at temperature T plus the
usual cross-entropy). Same trainer, checkpoints, resume and progress bar as `attnlab train`; the student is an
ordinary LM run that `attnlab eval/generate/quantize` take as it is.

The teacher is an attnlab LM run (`--teacher RUN`: the student shares its tokenizer and, unless --data.path
names other text, its corpus), or a transformers causal LM (`--teacher_hf DIR` and/or `--teacher_gguf_file F`,
loaded offline as `attnlab hf-eval` does): the student then trains on --data.path with the teacher's tokenizer,
which its run folder keeps (`--data.tokenizer hf`), so `attnlab eval/generate --ckpt STUDENT` need no teacher."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from typing import Literal

from ..errors import UserError
from ..run.config import RunConfig


@dataclass
class Config(RunConfig):
    """A student LM (any mechanism and transform) distilled from a teacher run sharing its tokenizer."""

    out: str = "runs/distill"
    """the student's run folder: checkpoints, metrics.jsonl, TensorBoard events, tokenizer"""
    teacher: str = ""
    """the teacher: an attnlab language-model run folder or checkpoint (or give --teacher_hf / --teacher_gguf_file)"""
    teacher_hf: str = ""
    """the teacher: a local transformers causal-LM directory (config.json, weights, tokenizer) or a .gguf file;
    the student trains on --data.path with its tokenizer"""
    teacher_gguf_file: str = ""
    """the teacher: a GGUF file (a path, or a name inside --teacher_hf); needs `pip install 'attnlab[hf]'`"""
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """the dtype a transformers teacher runs in"""
    alpha: float = 0.5
    """weight of the KL term; 1 − alpha weighs the cross-entropy against the labels"""
    temperature: float = 2.0
    """softmax temperature of both distributions in the KL term"""
    top_k: int = 0
    """0: the teacher's whole distribution, computed on the fly; k > 0: its k most likely tokens only"""
    teacher_cache: str = ""
    """a folder to cache the teacher's top-k log-probabilities in (k·6 bytes per token; needs top_k > 0)"""

    def __post_init__(self):
        if self.teacher and (self.teacher_hf or self.teacher_gguf_file):
            raise UserError("give one teacher: --teacher (an attnlab run) or --teacher_hf/--teacher_gguf_file "
                            "(a transformers model), not both")
        if self.teacher_hf or self.teacher_gguf_file:
            if self.data.source != "text" or not self.data.path:
                raise UserError("a transformers teacher needs the student's text: give --data.path")
            if self.data.tokenizer not in ("byte", "hf"):
                raise UserError(f"the student of a transformers teacher uses the teacher's tokenizer; drop "
                                f"--data.tokenizer {self.data.tokenizer}")
        if not 0 <= self.alpha <= 1:
            raise UserError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise UserError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0: the whole distribution), got {self.top_k}")
        if self.teacher_cache and not self.top_k:
            raise UserError("teacher_cache stores top-k log-probabilities: give top_k > 0 as well")


@dataclass
class Teacher:
    """What distillation needs of a teacher, whichever kind it is."""

    model: object  # token ids [B, N] -> logits [B, N, V]
    tokenizer: object  # the student's tokenizer: the teacher's (None: a run on a synthetic task)
    data: object  # the attnlab teacher's data config (None for a transformers model)
    source: str  # what the student's record names as its teacher
    vocab_size: int
    max_seq_len: int | None  # None: no stated limit
    params: int


def load_teacher(path) -> Teacher:
    """An attnlab language-model run (folder or checkpoint) as a teacher."""
    from ..run.load import load_run

    run = load_run(path)
    if run.kind != "lm":
        raise UserError(f"the teacher must be a language-model run; {run.ckpt} is a {run.kind!r} run")
    if run.record.get("quantized"):
        raise UserError(f"{run.ckpt} is quantised; distil from the fp32 run it came from")
    m = run.model
    return Teacher(m, run.tokenizer, run.data, str(run.ckpt), m.cfg.vocab_size, m.cfg.max_seq_len,
                   m.num_params(non_embedding=False))


def load_hf_teacher(cfg: Config) -> Teacher:
    """A transformers causal LM (directory or GGUF file) as a teacher; the student takes its tokenizer."""
    from ..integrations.hf_teacher import load_hf_teacher as load

    model, tok = load(cfg.teacher_hf or None, cfg.teacher_gguf_file or None, dtype=cfg.teacher_dtype)
    source = str(cfg.teacher_gguf_file or cfg.teacher_hf)
    return Teacher(model, tok, None, source, model.vocab_size, model.max_seq_len, model.num_params())


def _same_tokenizer(a, b, text: str) -> bool:
    return a.vocab_size == b.vocab_size and a.encode(text) == b.encode(text)


def student_data(cfg: Config, teacher: Teacher):
    """The student's data config and tokenizer. An attnlab teacher's unless --data.path names other text, in
    which case its tokenizer must encode that text exactly as the teacher's does; a transformers teacher's
    tokenizer on --data.path."""
    if teacher.data is None:  # a transformers model: its tokenizer is the only one that fits (Config checks)
        return replace(cfg.data, tokenizer="hf"), teacher.tokenizer
    if not cfg.data.path:
        if teacher.tokenizer is None:
            raise UserError("the teacher was trained on a synthetic task; give the student's data (--data.*)")
        return teacher.data, teacher.tokenizer
    if cfg.data.tokenizer == "hf":  # a pretrained model's tokenizer cannot be rebuilt from text: take the teacher's
        if getattr(teacher.tokenizer, "kind", None) != "hf":
            raise UserError(f"--data.tokenizer hf is a pretrained model's tokenizer; the teacher's is "
                            f"{getattr(teacher.tokenizer, 'name', 'none')}")
        return cfg.data, teacher.tokenizer
    from ..data.text import read_text
    from ..run.build import tokenizer_for

    tok = tokenizer_for(cfg.data, None)
    if teacher.tokenizer is None or not _same_tokenizer(tok, teacher.tokenizer, read_text(cfg.data.path)[:20000]):
        raise UserError(f"the teacher's vocabulary ({teacher.vocab_size} tokens, "
                        f"{getattr(teacher.tokenizer, 'name', 'none')}) differs from the student's "
                        f"({tok.vocab_size}, {tok.name}); distil with the teacher's tokenizer")
    return cfg.data, teacher.tokenizer


def main(cfg: Config) -> dict:
    from ..run.build import build
    from ..tasks.distill import BYTES_PER_CACHED_TOKEN, DistillTask
    from ..training import claim_run_dir, distributed, is_main, train
    from ..training.checkpoint import list_checkpoints

    if not (cfg.teacher or cfg.teacher_hf or cfg.teacher_gguf_file):
        raise UserError("a teacher is required: --teacher (an attnlab language-model run), or --teacher_hf / "
                        "--teacher_gguf_file (a transformers causal LM)")
    teacher = load_teacher(cfg.teacher) if cfg.teacher else load_hf_teacher(cfg)
    data, tok = student_data(cfg, teacher)
    out = claim_run_dir(cfg.out, cfg.train.resume)
    try:
        if is_main() and not (out / "tokenizer").is_dir():
            tok.save(out / "tokenizer")
        run_cfg = RunConfig(out=cfg.out, task="lm", model=cfg.model, data=data, train=cfg.train, optim=cfg.optim)
        built = build(run_cfg, out, fresh=False, tokenizer=tok)
        model = built.model
        if teacher.max_seq_len is not None and model.cfg.max_seq_len > teacher.max_seq_len:
            raise UserError(f"the student's max_seq_len ({model.cfg.max_seq_len}) is longer than its teacher's "
                            f"({teacher.max_seq_len}): the teacher cannot score its windows")
        n_s, n_t = model.num_params(non_embedding=False), teacher.params
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
        distill = {"teacher": teacher.source, "teacher_kind": "attnlab" if cfg.teacher else "transformers",
                   "alpha": cfg.alpha, "temperature": cfg.temperature, "top_k": cfg.top_k}
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
