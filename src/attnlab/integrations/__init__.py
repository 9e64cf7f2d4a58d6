"""Bridges from attnlab's attention kernels to other libraries.

`hf` patches Hugging Face transformers models (needs the optional extra `attnlab[hf]`); `hf_eval` measures a
patched checkpoint's perplexity and speed against the unpatched one. Neither is imported here, so attnlab
works without transformers installed.
"""
