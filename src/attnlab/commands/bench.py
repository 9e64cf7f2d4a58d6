"""`attnlab bench NAME`: one of the registered benchmarks (`attnlab list` shows them)."""

from __future__ import annotations

from .run import main, registered

__all__ = ["entries", "main"]


def entries() -> dict[str, tuple[type, str]]:
    return registered("benchmark")
