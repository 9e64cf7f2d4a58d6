"""`attnlab generate`: sample text from a trained run, with a KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError


@dataclass
class Config:
    ckpt: str = ""
    """a run folder or one checkpoint folder of a model trained on text (required)"""
    prompt: str = ""
    """the text to continue"""
    max_new_tokens: int = 200
    """tokens to generate after the prompt"""
    temperature: float = 0.8
    """sampling temperature; 0: greedy"""
    top_k: int | None = None
    """sample among the k most likely tokens only"""
    top_p: float | None = None
    """sample among the most likely tokens whose probabilities add up to p (nucleus sampling)"""
    stop: list[str] = field(default_factory=list)
    """stop strings, each exactly one token of the run's tokenizer"""
    num_samples: int = 1
    """independent samples of the same prompt"""
    sliding_window: bool = True
    """keep generating past the context by conditioning on the latest tokens"""
    seed: int = 0
    """seed of the sampling"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N"""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise UserError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


def main(cfg: Config) -> list[str]:
    import torch

    from ..inference.generate import generate
    from ..run.load import load_run
    from ..training.device import resolve_device

    if not cfg.ckpt:
        raise UserError("--ckpt is required")
    run = load_run(cfg.ckpt)
    if run.tokenizer is None:
        raise UserError("generate needs a model trained on text")
    device, _ = resolve_device(cfg.device, "float32")
    model = run.model.to(device).eval()
    tok = run.tokenizer
    ids = tok.encode(cfg.prompt) or [0]
    stops = []
    for s in cfg.stop:
        enc = tok.encode(s)
        if len(enc) != 1:
            raise UserError(f"stop string {s!r} is {len(enc)} tokens; it must be exactly one")
        stops.append(enc[0])
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    prompt = torch.tensor([ids] * cfg.num_samples, device=device)
    out = generate(model, prompt, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   stop_tokens=tuple(stops), generator=g, sliding_window=cfg.sliding_window)
    texts = [tok.decode(row.tolist()) for row in out]
    for t in texts:
        print(t)
        print("-" * 40)
    return texts
