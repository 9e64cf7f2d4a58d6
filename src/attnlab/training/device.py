"""Device, dtype and autocast chosen at run time."""

from __future__ import annotations

import contextlib

import torch

from ..errors import UserError


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype | None]:
    """Return (device, autocast dtype or None for plain float32).

    "auto" picks CUDA when present, and bf16 autocast where the GPU supports it; on CPU it stays in float32,
    which is faster there than emulated bf16 matmuls on most machines.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no CUDA GPU is available")
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    table = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise UserError(f"dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
    return dev, table[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
