"""Inference: generation with a KV cache (beam search and self-ensembles live in sibling modules)."""

from .generate import generate

__all__ = ["generate"]
