"""`attnlab finetune`: continue training a pretrained causal LM (directory or GGUF) on a text file with attnlab
attention patched into chosen layers, in full or through LoRA adapters."""

from ..integrations.hf_finetune import FinetuneConfig as Config
from ..integrations.hf_finetune import finetune as main

__all__ = ["Config", "main"]
