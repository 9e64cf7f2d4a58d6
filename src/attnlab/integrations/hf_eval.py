"""`attnlab hf-eval`: perplexity and speed of a local transformers checkpoint with attnlab attention patched
into chosen layers, side by side with the unpatched model, on one copy of the weights.

The text is tokenized with the checkpoint's own tokenizer and cut into non-overlapping windows of `context`
tokens; each window is scored from scratch (no carried-over context), so every token is predicted from at most
`context - 1` previous tokens. Perplexity is e-based: exp(mean negative log-likelihood in nats). The official
HyperAttention script prints 2**nats instead; multiply our nats by 1/ln 2 ≈ 1.4427 to get bits.
Times are forward passes only (not the loss), interleaved window by window between the two sides.
Nothing is fetched from the network: the model and tokenizer load from `model` (a directory) or a GGUF file
with local_files_only (`hf_load`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..attention.registry import kernel_entry
from ..errors import UserError, require_file
from ..bench.measure import sync
from ..inference.ensemble import attention_mode, mean_probability
from ..training.device import resolve_device
from .hf import attention_modules, original_attention, patch_model, require_transformers
from .hf_load import DTYPES, load_pretrained
from .hf_transform import apply_saved

@dataclass
class HFEvalConfig:
    """Score a text with a local transformers checkpoint, unpatched and patched."""

    model: str = ""
    """a local checkpoint directory (config.json, weights, tokenizer files), or a .gguf file"""
    gguf_file: str | None = None
    """a GGUF file to load instead (a path, or a name inside --model); needs `pip install 'attnlab[hf]'`"""
    data: str = ""
    """a UTF-8 text file to score"""
    attention: str = "hyper"
    """the attnlab mechanism patched in (`attnlab list`)"""
    options: dict[str, Any] = field(default_factory=dict)
    """the mechanism's options, e.g. {"prescore": "kmeans", "top_k": 1024}"""
    layers: str = "all"
    """where it runs: all, first:N, last:N, odd, even, or 0,3,5; the other layers keep the model's attention"""
    context: int = 4096
    """tokens per window"""
    windows: int = 4
    """how many windows to score (0: every full window in the file)"""
    batch_size: int = 1
    """windows per forward pass"""
    ensemble: int = 0
    """> 0: that many subsampled passes per window, probabilities averaged (SSA's self-ensemble; the patched
    kernels run in their "sample" mode)"""
    repeats: int = 1
    """timed forward passes per window and side (the median is kept)"""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """the dtype the model is loaded in"""
    seed: int = 0
    """seed of stochastic mechanisms"""
    out: str | None = None
    """where to write the JSON result (none: print only)"""


def hf_eval(cfg: HFEvalConfig) -> dict:
    """Score `cfg.data` with the unpatched and the patched model; print a table, write JSON, return it."""
    _check(cfg)
    transformers = require_transformers()
    device, _ = resolve_device(cfg.device, "float32")
    tokenizer, model = load_local(cfg.model, cfg.dtype, device, gguf_file=cfg.gguf_file)
    windows = token_windows(tokenizer, Path(cfg.data), cfg.context, cfg.windows)
    chosen = patch_model(model, cfg.attention, cfg.options, cfg.layers, decode="refuse")
    n_layer = len(attention_modules(model))

    sides = {"unpatched": _Side(), "patched": _Side()}
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        # One untimed pass per side: first-call allocations and lazy initialisation stay out of the timings.
        warm = windows[: cfg.batch_size].to(device)
        with original_attention(model):
            _forward(model, warm, device)
        _forward(model, warm, device)
        for start in range(0, len(windows), cfg.batch_size):
            batch = windows[start : start + cfg.batch_size].to(device)
            with original_attention(model):
                sides["unpatched"].add(*_score(model, batch, device, cfg.repeats, passes=1))
            with attention_mode(model, "sample" if cfg.ensemble else None):
                sides["patched"].add(*_score(model, batch, device, cfg.repeats, passes=max(1, cfg.ensemble)))

    result = {
        "model": str(cfg.model),
        "gguf_file": cfg.gguf_file,
        "data": str(cfg.data),
        "attention": cfg.attention,
        "options": dict(cfg.options),
        "layers": cfg.layers,
        "patched_layers": chosen,
        "n_layer": n_layer,
        "context": cfg.context,
        "windows": len(windows),
        "tokens_scored": sides["patched"].tokens,
        "ensemble": cfg.ensemble,
        "device": str(device),
        "dtype": cfg.dtype,
        "perplexity_base": "e",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "unpatched": sides["unpatched"].summary(),
        "patched": sides["patched"].summary(),
    }
    result["time_ratio"] = result["patched"]["seconds"] / max(result["unpatched"]["seconds"], 1e-12)
    print(format_table(result))
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"config": asdict(cfg), **result}, indent=2) + "\n")
    return result


def label(attention: str, options: dict[str, Any]) -> str:
    if not options:
        return attention
    return attention + "(" + ", ".join(f"{k}={v}" for k, v in sorted(options.items())) + ")"


def format_table(r: dict) -> str:
    head = (
        f"{r.get('gguf_file') or r['model']}: context {r['context']}, {r['windows']} window(s), {r['tokens_scored']} tokens scored, "
        f"layers {r['layers']} -> {r['patched_layers']} of {r['n_layer']}, {r['device']} {r['dtype']}"
    )
    rows = [("attention", "perplexity (e)", "nats/token", "s/window", "time vs unpatched")]
    for key, name in (("unpatched", "unpatched (model's own)"), ("patched", label(r["attention"], r["options"]))):
        s = r[key]
        if key == "patched" and r["ensemble"]:
            name += f" x{r['ensemble']} ensemble"
        ratio = s["seconds"] / max(r["unpatched"]["seconds"], 1e-12)
        rows.append((name, f"{s['perplexity']:.4f}", f"{s['nll']:.4f}", f"{s['seconds_per_window']:.3f}",
                     f"{ratio:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [head]
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def load_local(path: str | Path | None, dtype: str = "float32", device: torch.device | str = "cpu",
               gguf_file: str | Path | None = None):
    """Tokenizer and causal LM from a local directory or GGUF file, never from the network, with SDPA attention
    (`hf_load.load_pretrained`), and the key/value transform a saved fine-tune carries."""
    tokenizer, model = load_pretrained(path, gguf_file, dtype=dtype, device=device)
    if gguf_file is None and path is not None and Path(path).is_dir():
        apply_saved(model, Path(path))  # a fine-tune's retrofitted transform is part of the model
    return tokenizer, model


def token_windows(tokenizer, path: Path, context: int, windows: int) -> torch.Tensor:
    """[W, context] token ids: the first `windows` non-overlapping windows of the file (0 = all of them)."""
    require_file(path, "data file")
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    have = len(ids) // context
    if have == 0:
        raise UserError(f"{path} holds {len(ids)} tokens, fewer than one window of --context {context}")
    if windows and windows > have:
        raise UserError(f"{path} holds {have} window(s) of {context} tokens, fewer than --windows {windows}")
    n = windows or have
    return torch.tensor(ids[: n * context], dtype=torch.long).view(n, context)


class _Side:
    def __init__(self):
        self.nll_sum = 0.0
        self.tokens = 0
        self.times: list[float] = []
        self.windows = 0

    def add(self, nll_sum: float, tokens: int, seconds: float, windows: int) -> None:
        self.nll_sum += nll_sum
        self.tokens += tokens
        self.times.append(seconds)
        self.windows += windows

    def summary(self) -> dict:
        nll = self.nll_sum / self.tokens
        total = sum(self.times)
        return {"nll": nll, "perplexity": math.exp(nll), "seconds": total, "seconds_per_window": total / self.windows}


def _score(model, batch, device, repeats, passes):
    """(Σ nll, tokens, forward seconds, windows) of one batch; `passes` > 1 averages their probabilities."""
    logps, seconds = [], 0.0
    for _ in range(passes):
        times = []
        for _ in range(max(1, repeats)):
            logits, dt = _forward(model, batch, device)
            times.append(dt)
        seconds += statistics.median(times)
        logps.append(_target_logprobs(logits, batch))
    ens = mean_probability([lp.unsqueeze(-1) for lp in logps])  # only the targets' probabilities are kept
    if not bool((ens.passes > 0).all()):
        raise UserError("every ensemble pass gave a non-finite probability at some position")
    lp = ens.log_probs.squeeze(-1)
    return -float(lp.sum()), lp.numel(), seconds, batch.shape[0]


def _forward(model, batch, device):
    sync(device)
    t0 = time.perf_counter()
    logits = model(input_ids=batch, use_cache=False).logits
    sync(device)
    return logits, time.perf_counter() - t0


def _target_logprobs(logits, batch, chunk=1024):
    """log p(token t+1 | ≤ t) for every position, in float32 and in chunks so the vocabulary-wide
    log-softmax never needs a second full-size copy of the logits."""
    out = []
    targets = batch[:, 1:]
    for s in range(0, targets.shape[1], chunk):
        lg = logits[:, s : min(s + chunk, targets.shape[1])].float()
        tg = targets[:, s : s + lg.shape[1]]
        out.append(lg.gather(-1, tg[..., None]).squeeze(-1) - torch.logsumexp(lg, dim=-1))
    return torch.cat(out, dim=1).double()


def _check(cfg: HFEvalConfig) -> None:
    if not cfg.model and not cfg.gguf_file:
        raise UserError("--model is required: a local directory holding a transformers checkpoint (or --gguf-file)")
    if not cfg.data:
        raise UserError("--data is required: a UTF-8 text file to score")
    if cfg.context < 2:
        raise UserError(f"--context must be at least 2 tokens, got {cfg.context}")
    for name in ("windows", "ensemble"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("batch_size", "repeats"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    entry = kernel_entry(cfg.attention)
    if cfg.ensemble and "sample" not in entry.cls.modes:
        raise UserError(
            f"--ensemble needs a stochastic mechanism with a 'sample' mode (e.g. ssa); {cfg.attention!r} has none"
        )


def byte_level_tokenizer():
    """A transformers tokenizer whose ids are the UTF-8 bytes of the text (0..255), for byte-level models
    such as the one `python -m attnlab.integrations.tiny_llama` trains; save it next to the model with save_pretrained."""
    require_transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's printable stand-ins for the 256 bytes, which byte-level pre-tokenization emits.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 30)
