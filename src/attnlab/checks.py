"""Range checks for config dataclasses, called from their `__post_init__` so a bad value fails at parse time.

Each check names the option the way the command line spells it (`model.d_model`), because the CLI prints the
message as it is.
"""

from __future__ import annotations

import dataclasses
import math
import typing

from .errors import UserError


def require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def positive(cfg, prefix: str, *names: str, optional: bool = False) -> None:
    """Each field is >= 1 (ints) or > 0 (floats); with optional=True, None is accepted too."""
    for name in names:
        v = getattr(cfg, name)
        if v is None and optional:
            continue
        require(v is not None and v > 0 and _finite(v), f"{prefix}.{name} must be positive, got {v!r}")


def non_negative(cfg, prefix: str, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        require(v is not None and v >= 0 and _finite(v), f"{prefix}.{name} must be 0 or more, got {v!r}")


def fraction(cfg, prefix: str, *names: str) -> None:
    """Each field lies in [0, 1): dropout rates, Adam's betas."""
    for name in names:
        v = getattr(cfg, name)
        require(v is not None and 0 <= v < 1, f"{prefix}.{name} must be in [0, 1), got {v!r}")


def literals(cfg, prefix: str) -> None:
    """Fields typed Literal[...] hold one of their values (from_dict checks this too; Python callers may not)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        tp = hints.get(f.name)
        if typing.get_origin(tp) is typing.Literal:
            v = getattr(cfg, f.name)
            args = typing.get_args(tp)
            require(v in args, f"{prefix}.{f.name} must be one of {', '.join(map(str, args))}, got {v!r}")


def _finite(v) -> bool:
    return not isinstance(v, float) or math.isfinite(v)
