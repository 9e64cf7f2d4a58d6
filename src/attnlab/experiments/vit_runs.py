"""What the ViT experiments share: one base image run, training a variant through the experiment context,
scoring a split under an attention mode, and means with standard errors over seeds."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..attention import AttentionSpec
from ..data.images import ImageDataConfig, load_images
from ..errors import UserError
from ..models.vit import ViT, ViTConfig
from ..run.image import EVAL_BATCH, ImageRunConfig, build
from ..tasks.image import ImageClassificationTask, classification_metrics
from ..training import OptimConfig, TrainConfig
from ..training.device import autocast

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist; named in messages only


def load_data(path: str, experiment: str, **options):
    """(ImageDataConfig, ImageDataset) of `path`; `options` are ImageDataConfig fields."""
    if not path:
        raise UserError(f"{experiment} needs --data: a folder of IDX files (e.g. {FASHION_MNIST}) or of class "
                        "sub-folders")
    cfg = ImageDataConfig(path=path, **options)
    return cfg, load_images(cfg)


def vit_run(data_cfg: ImageDataConfig, *, patch_size: int, d_model: int, n_layer: int, n_head: int,
            batch_size: int, steps: int, lr: float, warmup_steps: int, eval_every: int, seed: int,
            weight_decay: float = 0.05, attention: AttentionSpec | None = None) -> ImageRunConfig:
    """The base of the ViT experiments: AdamW with cosine decay to lr/100, a quiet trainer, one checkpoint."""
    model = ViTConfig(patch_size=patch_size, d_model=d_model, n_layer=n_layer, n_head=n_head,
                      attention=attention or AttentionSpec())
    train = TrainConfig(steps=steps, batch_size=batch_size, eval_every=eval_every, log_every=10, seed=seed,
                        tensorboard=False, keep_checkpoints=1, progress=False)
    optim = OptimConfig(lr=lr, min_lr=lr / 100, warmup_steps=warmup_steps, weight_decay=weight_decay)
    return ImageRunConfig(out="", model=model, data=data_cfg, train=train, optim=optim)


def with_vit_attention(cfg: ImageRunConfig, name: str, options: dict | None = None) -> ImageRunConfig:
    spec = replace(cfg.model.attention, name=name, options=dict(options or {}))
    return replace(cfg, model=replace(cfg.model, attention=spec))


def train_vit(ctx, cfg: ImageRunConfig, data, name: str, *, model: ViT | None = None):
    """Train `cfg` (a fresh model from cfg.train.seed, or `model` further) into OUT/runs/NAME, loadable by
    `attnlab eval`. Returns (model, task, TrainResult)."""
    built = build(cfg, data=data)
    model = model if model is not None else built.model
    return ctx.train(built.config, name, model=model, task=built.task, record=True)


def clone(model: ViT) -> ViT:
    twin = ViT(model.cfg)
    twin.load_state_dict(model.state_dict())
    return twin.to(next(model.parameters()).device)


def scoring_split(data) -> str:
    return "test" if "test" in data.splits else "val"


class Scorer:
    """Accuracy and loss of models on the first `images` images of one split (all: 0), in batches of
    EVAL_BATCH, with the passes' random draws fixed by a seed."""

    def __init__(self, data, split: str, images: int, device, amp):
        self.task = ImageClassificationTask(data, EVAL_BATCH, 0, augment=False, eval_batch_size=EVAL_BATCH)
        self.split, self.device, self.amp = split, device, amp
        n = len(data.split(split)[1])
        self.limit = math.ceil(min(images or n, n) / EVAL_BATCH)
        self.labels = self.task.labels(split, self.limit)
        self.train_images = len(data.split("train")[1])

    def __call__(self, model, *, mode: str | None = None, k: int = 1, seed: int = 0) -> dict:
        model.eval()
        with autocast(torch.device(self.device), self.amp):
            probs = self.task.predict(model, self.split, self.device, mode=mode, k=k, seed=seed, limit=self.limit)
        m = classification_metrics(probs, self.labels)
        return {"accuracy": m["accuracy"], "loss": m["nll"], "images": m["n"]}


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None for a single value)."""
    t = torch.tensor(values, dtype=torch.float64)
    if len(values) < 2:
        return float(t.mean()), None
    return float(t.mean()), float(t.std(unbiased=True) / math.sqrt(len(values)))


def pm(mean: float | None, se: float | None, scale: float = 100.0, digits: int = 2) -> str:
    """"mean ± se" in percent (scale 100) for tables."""
    if mean is None:
        return ""
    return f"{mean * scale:.{digits}f}" + ("" if se is None else f" ± {se * scale:.{digits}f}")

