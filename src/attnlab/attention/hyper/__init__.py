"""HyperAttention with key pre-scoring: the kernel (`kernel`), sortLSH hashing (`lsh`), key scores
(`prescore`) and the exact pieces that return their log-sum-exp (`lse`)."""

from . import lsh, prescore
from .kernel import HyperAttention, HyperConfig, hyper_attention
from .lse import attention_lse

__all__ = ["HyperAttention", "HyperConfig", "attention_lse", "hyper_attention", "lsh", "prescore"]
