"""Typed configs: dataclasses to and from plain dicts and YAML, refusing unknown keys and wrong types."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from .errors import UserError


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict | None, where: str = "config", *, noun: str = "key"):
    """Build dataclass `cls` from `data`, recursing into nested dataclasses; one-line error on bad input.

    `where` and `noun` name the mapping in messages: "unknown key(s) x in config.model" for a config file,
    "unknown option(s) x for attention 'hyper'" for a kernel's options (noun="option").
    """
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        place = "in" if noun == "key" else "for"
        raise UserError(f"unknown {noun}(s) {', '.join(unknown)} {place} {where}; valid: {', '.join(fields) or 'none'}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        label = f"{where}.{key}" if noun == "key" else f"{where} {noun} {key!r}"
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, label)
        elif typing.get_origin(tp) is dict:
            if not isinstance(value, dict):
                raise UserError(f"{label} must be a mapping, got {value!r}")
            kwargs[key] = dict(value)
        else:
            kwargs[key] = coerce(value, tp, label)
    return cls(**kwargs)


def coerce(value, tp, where: str):
    """Check `value` against type hint `tp` (unions, Literal, list/tuple, bool, int, float, str) and return it
    converted where that is lossless (an int for a float, a list for a tuple); `where` names it in the error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {value!r}")
        return origin(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where} must be a string, got {value!r}")
    return value


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
