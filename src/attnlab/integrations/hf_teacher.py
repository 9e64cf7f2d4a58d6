"""A transformers causal LM as a distillation teacher (`attnlab distill --teacher_hf DIR | --teacher_gguf_file F`).

    from attnlab.integrations.hf_teacher import load_hf_teacher
    teacher, tokenizer = load_hf_teacher("runs/tiny-llama")            # or gguf_file="SmolLM2-135M....gguf"
    logits = teacher(ids)                                              # [B, N] -> [B, N, V], float

The model comes through the loader `attnlab hf-eval` and `attnlab finetune` use (`hf_eval.load_local`: a local
directory or a GGUF file, never the network, with a fine-tune's saved key/value transform). Any
AutoModelForCausalLM works: the teacher only runs forward passes on whole windows, in eval mode and without
gradients (`tasks.distill.DistillTask` moves it to the student's device). The student takes the teacher's
tokenizer as an attnlab `PretrainedTokenizer` (its `tokenizer.json`, without the special tokens transformers
would add), sized to the teacher's output layer so both distributions run over the same ids.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..data.tokenizers import PretrainedTokenizer
from ..errors import UserError


class HFTeacher(nn.Module):
    """Wraps a transformers causal LM so that calling it maps token ids to next-token logits."""

    def __init__(self, model):
        super().__init__()
        self.hf = model.eval()
        for p in self.hf.parameters():
            p.requires_grad_(False)

    @property
    def vocab_size(self) -> int:
        """Width of the logits: the output layer's rows (a model may pad them beyond its tokenizer)."""
        out = self.hf.get_output_embeddings()
        if out is not None and getattr(out, "weight", None) is not None:
            return int(out.weight.shape[0])
        return int(self.hf.config.get_text_config().vocab_size)

    @property
    def max_seq_len(self) -> int | None:
        """The longest window the model was built for, where its config says (None: no stated limit)."""
        n = getattr(self.hf.config.get_text_config(), "max_position_embeddings", None)
        return int(n) if n else None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.hf.parameters())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.hf(input_ids=ids, use_cache=False).logits


def student_tokenizer(hf_tokenizer, vocab_size: int, where: str) -> PretrainedTokenizer:
    """The attnlab form of a transformers tokenizer, sized to a teacher with `vocab_size` output tokens;
    refuses one the teacher cannot score (more tokens than its logits) and one with no `tokenizer.json` form."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"the tokenizer of {where} has no fast (tokenizers) form; the student needs one")
    own = backend.get_vocab_size(with_added_tokens=False)  # special tokens added beyond it never come from text
    if own > vocab_size:
        raise UserError(f"the teacher's vocabulary ({vocab_size} output tokens) differs from its tokenizer's "
                        f"({own} tokens, {where}): the student could not be scored on every id")
    return PretrainedTokenizer(backend, vocab_size)


def load_hf_teacher(model: str | Path | None = None, gguf_file: str | Path | None = None, *,
                    dtype: str = "float32") -> tuple[HFTeacher, PretrainedTokenizer]:
    """(teacher on the CPU, the student's tokenizer) from a local transformers directory or a GGUF file."""
    from transformers.utils import logging as hf_logging

    from .hf_eval import load_local

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a refused teacher must leave one line on stderr
    try:
        tokenizer, lm = load_local(model, dtype, "cpu", gguf_file=gguf_file)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    teacher = HFTeacher(lm)
    return teacher, student_tokenizer(tokenizer, teacher.vocab_size, str(gguf_file or model))
