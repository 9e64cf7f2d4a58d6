"""Tasks: what the trainer trains on. A task owns its data, its loss and its evaluation:

    batch(step, micro, rank, device) -> dict       deterministic in its arguments (resumable)
    loss(model, batch) -> (mean loss, count)       count: tokens or examples the loss covers
    evaluate(model, device) -> {metric: float}     on the fixed validation set
    eval_batches(split, limit) -> iterator          the batches `evaluate` reads
"""

from .forecast import ForecastTask
from .image import ImageClassificationTask
from .lm import SyntheticConfig, SyntheticTask, TextLMTask

__all__ = ["ForecastTask", "ImageClassificationTask", "SyntheticConfig", "SyntheticTask", "TextLMTask"]
