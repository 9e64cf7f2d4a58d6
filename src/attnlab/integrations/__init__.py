"""Bridges from attnlab's attention kernels to other libraries.

`hf` patches Hugging Face transformers models (needs the optional extra `attnlab[hf]`); `hf_eval` measures a
patched checkpoint's perplexity and speed against the unpatched one; `hf_load` loads a local directory or a
GGUF file; `hf_transform` retrofits key/value transforms (KV shifting); `hf_finetune` fine-tunes with the
mechanism in place (full or LoRA) and `hf_saved` saves and restores the result; `hf_tail` scores many
"last n layers" variants on one shared prefix. None is imported here, so attnlab works without transformers
installed.
"""
