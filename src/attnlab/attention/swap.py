"""Swapping the kernel of chosen layers of a built (e.g. trained) model; works for any registered kernel.

A replacement kernel goes through the same capability check as the kernel the model was built with: each
layer remembers what its use requires (`MultiHeadAttention.need`: causal for a language model, non-causal and
masks for an encoder, ...), so a kernel that cannot do it is refused with one line, not run wrongly.
"""

from __future__ import annotations

import contextlib

from torch import nn

from ..errors import UserError
from .registry import Kernel, build_kernel, select_layers


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The model's attention layers (modules holding a `kernel`) in module order: for an LM, layer order."""
    return [m for m in model.modules() if isinstance(getattr(m, "kernel", None), Kernel)]


def swap_attention(model: nn.Module, name: str, options: dict | None = None, layers: str = "all", *,
                   need: dict[str, bool] | None = None) -> list[tuple[nn.Module, Kernel]]:
    """Give the chosen attention layers ("all", "first:N", "last:N", "odd", "even", "0,3,5") a new `name`
    kernel built from the registry; returns [(layer, previous kernel)] for `restore_attention`.

    Each new kernel must have the capabilities its layer was built to need (`layer.need`) plus `need`.
    """
    attn = attention_layers(model)
    if not attn:
        raise UserError("this model has no attention layers to swap")
    chosen = select_layers(layers, len(attn))
    # Build every kernel before touching the model, so a refused one leaves the model as it was.
    kernels = [build_kernel(name, options, need={**getattr(attn[i], "need", {}), **(need or {})}) for i in chosen]
    swapped = []
    for i, kernel in zip(chosen, kernels):
        layer = attn[i]
        device = next((p.device for p in layer.parameters()), None)
        swapped.append((layer, layer.kernel))
        layer.kernel = kernel.to(device) if device is not None else kernel
    return swapped


def restore_attention(swapped: list[tuple[nn.Module, Kernel]]) -> None:
    for layer, kernel in reversed(swapped):
        layer.kernel = kernel


@contextlib.contextmanager
def swapped_attention(model: nn.Module, name: str, options: dict | None = None, layers: str = "all", *,
                      need: dict[str, bool] | None = None):
    """`with swapped_attention(model, "hyper", {...}, "last:2"):` evaluates with the swap, then undoes it."""
    swapped = swap_attention(model, name, options, layers, need=need)
    try:
        yield model
    finally:
        restore_attention(swapped)
