"""attnlab: a lab for Transformers whose attention can be swapped."""

__version__ = "0.1.0"
