"""Load a pretrained causal language model offline: a local transformers directory or a GGUF file.

    from attnlab.integrations.hf_load import load_pretrained
    tokenizer, model = load_pretrained("runs/tiny-llama")                       # config.json + weights
    tokenizer, model = load_pretrained(gguf_file="path/SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer, model = load_pretrained("path/", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")

A GGUF file is read by transformers (the `gguf` package; `pip install 'attnlab[hf]'`), its tensors dequantised
to the requested dtype and its tokenizer rebuilt from the file's metadata. transformers marks such a model as
"quantized with gguf" and refuses to `save_pretrained` it although its weights are ordinary float tensors, so
the loader rebuilds the same class from the config (minus that mark) and the state dict: the result is a
plain model that saves, fine-tunes and wraps in PEFT like any other.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..errors import UserError
from .hf import require_transformers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF_MAGIC = b"GGUF"


def resolve_source(model: str | Path | None, gguf_file: str | Path | None = None) -> tuple[Path, str | None]:
    """(directory, GGUF file name or None) of a model given as a directory, a .gguf path, or a directory plus
    a GGUF file inside it; refuses a missing path, a directory without config.json, a file that is not GGUF."""
    model = Path(model).expanduser() if model else None
    if gguf_file is None and model is not None and model.suffix.lower() == ".gguf":
        model, gguf_file = None, model
    if gguf_file is not None:
        g = Path(gguf_file).expanduser()
        if not g.is_absolute() and model is not None and (model / g).exists():
            g = model / g
        if not g.is_file():
            raise UserError(f"GGUF file not found: {g}")
        with open(g, "rb") as f:
            head = f.read(4)
        if head != GGUF_MAGIC:
            raise UserError(f"{g} is not a GGUF file (it does not start with the GGUF magic bytes)")
        g = g.resolve()
        return g.parent, g.name
    if model is None:
        raise UserError("no model given: pass a transformers checkpoint directory or a GGUF file (--gguf-file)")
    if not model.is_dir():
        raise UserError(f"model directory not found: {model}")
    if not (model / "config.json").is_file():
        raise UserError(f"{model} has no config.json: point at a saved transformers checkpoint, or at a GGUF file "
                        "with --gguf-file")
    return model, None


def load_pretrained(model: str | Path | None = None, gguf_file: str | Path | None = None, *,
                    dtype: str = "float32", device: torch.device | str = "cpu", tokenizer: bool = True,
                    train: bool = False):
    """(tokenizer or None, causal LM with SDPA attention, eager where the architecture has no SDPA path) from a
    local directory or GGUF file, never from the network. The model is in eval mode unless `train`."""
    require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    where, gguf = resolve_source(model, gguf_file)
    what = where / gguf if gguf else where
    extra = {"gguf_file": gguf} if gguf else {}
    if gguf:
        _require_gguf()
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot load a tokenizer from {what}: {_first_line(e)}") from None
    lm = None
    for impl in ("sdpa", "eager"):  # eager only for architectures that have no SDPA path (Gemma 2)
        try:
            lm = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, attn_implementation=impl,
                                                      dtype=DTYPES[dtype], **extra)
            break
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            if impl == "sdpa" and "scaled_dot_product_attention" in str(e):
                continue
            raise UserError(f"cannot load a causal language model from {what}: {_first_line(e)}") from None
    if gguf:
        lm = plain_model(lm)
    lm = lm.to(device)
    return tok, (lm.train() if train else lm.eval())


def plain_model(model):
    """The same model without transformers' GGUF "quantized" mark (its weights are dequantised already):
    rebuilt from the config and the state dict, so that save_pretrained and PEFT accept it."""
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    state = model.state_dict()
    out = type(model).from_pretrained(None, config=cfg, state_dict=state, attn_implementation=impl,
                                      dtype=next(model.parameters()).dtype)
    return out.to(next(model.parameters()).device)


def _require_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("reading GGUF files needs the gguf package: pip install 'attnlab[hf]'") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
