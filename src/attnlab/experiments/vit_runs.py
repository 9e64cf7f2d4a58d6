"""What the ViT experiments share: their --quick shrink, data and base run per seed, training a variant
through the experiment context, scoring a split under an attention mode, and means with standard errors over
seeds."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

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


def quick(cfg, steps: int, eval_every: int):
    """The --quick shrink of a ViT experiment config: at most 1,024 training and 256 scored images, a 2-block
    ViT of width 32, batches of 32, `steps` steps, 2 seeds."""
    return replace(cfg, limit_train=min(cfg.limit_train or 1024, 1024), eval_images=min(cfg.eval_images or 256, 256),
                   d_model=32, n_layer=2, n_head=2, steps=min(cfg.steps, steps), warmup_steps=5,
                   eval_every=eval_every, n_seeds=min(cfg.n_seeds, 2), batch_size=min(cfg.batch_size, 32))


@dataclass
class Setup:
    """What a ViT experiment builds once from its config: the data, the scorer, and the base run per seed."""
    cfg: object
    data_cfg: ImageDataConfig
    data: object
    split: str
    score: Scorer

    def base(self, seed: int) -> ImageRunConfig:
        """The experiment's model and schedule (AdamW with cosine decay to lr/100, a quiet trainer, one
        checkpoint), trained from `seed`."""
        c = self.cfg
        model = ViTConfig(patch_size=c.patch_size, d_model=c.d_model, n_layer=c.n_layer, n_head=c.n_head)
        train = TrainConfig(steps=c.steps, batch_size=c.batch_size, eval_every=c.eval_every, log_every=10,
                            seed=seed, tensorboard=False, keep_checkpoints=1, progress=False)
        optim = OptimConfig(lr=c.lr, min_lr=c.lr / 100, warmup_steps=c.warmup_steps, weight_decay=0.05)
        return ImageRunConfig(out="", model=model, data=self.data_cfg, train=train, optim=optim)


def setup(cfg, ctx, experiment: str, **data_options) -> Setup:
    """Load `cfg.data` (limit_train training images, 1,000 held out for validation) and score `cfg.eval_images`
    images of its test split (validation when it has none)."""
    data_cfg, data = load_data(cfg.data, experiment, limit_train=cfg.limit_train, limit_val=1000, **data_options)
    split = "test" if "test" in data.splits else "val"
    return Setup(cfg, data_cfg, data, split, Scorer(data, split, cfg.eval_images, ctx.device, ctx.amp))


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

