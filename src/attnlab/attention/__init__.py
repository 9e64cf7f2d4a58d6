"""Attention kernels, key/value transforms, the registry that names them and the layer that runs them."""

from .exact import exact_attention
from .layer import LayerCache, MultiHeadAttention
from .merge import merge, merge_many
from .reference import reference_attention
from .registry import (
    AttentionSpec,
    Capabilities,
    Kernel,
    Transform,
    build_kernel,
    build_transform,
    kernels,
    register_kernel,
    register_transform,
    select_layers,
    set_attention_mode,
    transforms,
)

__all__ = [
    "AttentionSpec", "Capabilities", "Kernel", "LayerCache", "MultiHeadAttention", "Transform",
    "build_kernel", "build_transform", "exact_attention", "kernels", "merge", "merge_many",
    "reference_attention", "register_kernel", "register_transform", "select_layers", "set_attention_mode",
    "transforms",
]
