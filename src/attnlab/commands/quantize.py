"""`attnlab quantize`: int8 for CPU inference. The result is a run folder that `attnlab eval/generate --ckpt`
load like any other; its safetensors hold int8 weights and fp32 scales, its config.json the manifest."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import UserError


@dataclass
class Config:
    ckpt: str = ""
    """a run folder (its latest checkpoint) or one checkpoint folder of a language model (required)"""
    out: str = ""
    """the new run folder for the int8 model; default: the run folder's name + '-int8', beside it"""
    scheme: Literal["dynamic", "weight-only"] = "dynamic"
    """dynamic: int8 weights and activations quantised at run time (fast on CPU); weight-only: int8 weights,
    computed in float"""


def quantize_run(ckpt, out, scheme: str = "dynamic") -> dict:
    """Quantise a run's model into a new run folder `out`; returns sizes and the manifest."""
    from ..inference.quantize import quantize_model, quantized_state
    from ..run.load import load_run
    from ..training.checkpoint import save_checkpoint
    from ..training.rundir import claim_run_dir

    run = load_run(ckpt)
    if run.record.get("quantized"):
        raise UserError(f"{run.ckpt} is already quantised ({run.record['quantized'].get('scheme')}); "
                        f"quantise the fp32 run it came from")
    if run.kind != "lm":
        raise UserError(f"quantize supports language-model runs; {run.ckpt} is a {run.kind!r} run")
    out = Path(out) if out else run.run_dir.with_name(run.run_dir.name + "-int8")
    out = claim_run_dir(out, resume=False)
    model = run.model.cpu().eval()
    manifest = quantize_model(model, scheme)
    record = {k: v for k, v in run.record.items() if k != "checksums"}
    record["quantized"] = {**manifest, "source": str(run.ckpt)}
    tail = run.ckpt.name.removeprefix("step_")
    step = int(tail) if tail.isdigit() else 0  # keep the source's step number in the new folder's name
    final = save_checkpoint(out, step, quantized_state(model), record)
    if (run.run_dir / "tokenizer").is_dir():
        shutil.copytree(run.run_dir / "tokenizer", out / "tokenizer")
    fp32 = (run.ckpt / "model.safetensors").stat().st_size
    int8 = (final / "model.safetensors").stat().st_size
    return {"out": str(out), "scheme": scheme, "fp32_bytes": fp32, "int8_bytes": int8, "ratio": int8 / fp32,
            "linears": len(manifest["linears"]), "embeddings": len(manifest["embeddings"])}


def main(cfg: Config) -> dict:
    if not cfg.ckpt:
        raise UserError("--ckpt is required")
    result = quantize_run(cfg.ckpt, cfg.out, cfg.scheme)
    print(json.dumps(result, indent=2))
    return result
