from .lm import LM, LMConfig

__all__ = ["LM", "LMConfig"]
