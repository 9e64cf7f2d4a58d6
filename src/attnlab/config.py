"""Typed configs: dataclasses to and from plain dicts and YAML, refusing unknown keys and wrong types."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from .errors import UserError


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict | None, where: str = "config"):
    """Build dataclass `cls` from `data`, recursing into nested dataclasses; one-line error on bad input."""
    from .attention.registry import _coerce

    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(unknown)} in {where}; valid: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, f"{where}.{key}")
        elif typing.get_origin(tp) is dict:
            if not isinstance(value, dict):
                raise UserError(f"{where}.{key} must be a mapping, got {value!r}")
            kwargs[key] = dict(value)
        else:
            kwargs[key] = _coerce(value, tp, f"{where}.{key}")
    return cls(**kwargs)


def load_yaml(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    return data or {}


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=False)
