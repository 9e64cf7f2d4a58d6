"""`attnlab hf-eval`: a local transformers checkpoint with attnlab attention in chosen layers, against the
unpatched model on the same windows."""

from ..integrations.hf_eval import HFEvalConfig as Config
from ..integrations.hf_eval import hf_eval as main

__all__ = ["Config", "main"]
