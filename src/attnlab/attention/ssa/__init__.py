"""SSA, stochastically subsampled attention: the kernel (`kernel`) and its fused CPU path (`flash`)."""

from . import flash
from .kernel import Draw, SSAAttention, SSAConfig, seed_sampling

__all__ = ["Draw", "SSAAttention", "SSAConfig", "flash", "seed_sampling"]
