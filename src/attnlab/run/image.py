"""The image kind: a Vision Transformer classifying images from IDX files or class folders.

    attnlab train --task image --data.path /usr/share/datasets/fashion-mnist --out runs/vit
    attnlab eval --ckpt runs/vit --split test --mode sample --ensemble 8

The data comes first: its image size, channels and classes fill the ViTConfig, so the model options only say
how big the network is. `attnlab eval` scores a whole split (top-1 accuracy, mean cross-entropy) and draws
the confusion matrix and the most confident mistakes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from ..config import from_dict
from ..data.images import ImageDataConfig, load_images
from ..errors import UserError
from ..models.vit import ViT, ViTConfig
from ..tasks.image import (
    ImageClassificationTask,
    check_label_smoothing,
    classification_metrics,
    confusion_matrix_png,
    misclassified_grid_png,
)
from ..training import OptimConfig, TrainConfig
from ..training.checkpoint import load_weights
from ..training.device import autocast
from .build import Built
from .kinds import Kind, register
from .load import LoadedRun

EVAL_BATCH = 256  # images per evaluation forward pass


@dataclass
class ImageRunConfig:
    """A Vision Transformer trained to classify images."""

    out: str = "runs/train"
    """the run folder: checkpoints, metrics.jsonl, TensorBoard events"""
    task: Literal["image"] = "image"
    """image: a ViT classifying the images of data.path (IDX files or one sub-folder per class)"""
    model: ViTConfig = field(default_factory=ViTConfig)
    """the ViT; its image size, channels and classes are taken from the data"""
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    """the images, their split, size and augmentation"""
    train: TrainConfig = field(default_factory=TrainConfig)
    """steps, batch size (images), evaluation and checkpoint cadence, seed, device"""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and its learning-rate schedule"""
    label_smoothing: float = 0.0
    """train against targets smoothed towards uniform by this much (validation loss stays plain cross-entropy)"""

    def __post_init__(self):
        check_label_smoothing(self.label_smoothing)  # when the options are parsed, not when training starts


def sized_for(model: ViTConfig, data) -> ViTConfig:
    """`model` with the image size, channels and classes of the loaded data."""
    c, h, w = data.shape
    return replace(model, image_size=h, image_width=0 if w == h else w, channels=c, num_classes=data.num_classes)


def image_task(data, data_cfg: ImageDataConfig, batch_size: int, seed: int,
               label_smoothing: float = 0.0) -> ImageClassificationTask:
    return ImageClassificationTask(data, batch_size, seed, augment=data_cfg.augment, flip=data_cfg.flip,
                                   crop_padding=data_cfg.crop_padding, eval_batch_size=EVAL_BATCH,
                                   label_smoothing=label_smoothing)


def build_model(cfg: ViTConfig, seed: int | None) -> ViT:
    if seed is not None:
        torch.manual_seed(seed)
    return ViT(cfg)


def build(cfg: ImageRunConfig, run_dir: Path | None = None, *, fresh: bool = True, data=None) -> Built:
    """Data (it fixes the image shape and classes), then the model from `train.seed`, then the task. Pass
    `data` (an ImageDataset) to share loaded images between runs."""
    data = data if data is not None else load_images(cfg.data)
    cfg = replace(cfg, model=sized_for(cfg.model, data))
    model = build_model(cfg.model, cfg.train.seed)
    task = image_task(data, cfg.data, cfg.train.batch_size, cfg.train.seed, cfg.label_smoothing)
    return Built(model, None, task, cfg)


def load(record: dict, ckpt, run_dir) -> LoadedRun:
    run = record.get("run", {})
    model = ViT(from_dict(ViTConfig, run.get("model"), "checkpoint model config"))
    load_weights(model, ckpt)
    data = from_dict(ImageDataConfig, run.get("data"), "checkpoint data config")
    return LoadedRun(model, None, data, record, ckpt, run_dir, "image")


def evaluate_split(model, task: ImageClassificationTask, split: str, *, mode: str = "auto", k: int = 1, seed: int = 0,
                   device=None, amp=None, flip: bool = False) -> tuple[dict, torch.Tensor]:
    """(metrics, probabilities [N, C]) of `model` on every image of `split`; k > 1 averages the class
    probabilities of k passes (mode "auto" then means "sample"), flip also averages those of the mirror image."""
    if k > 1 and mode == "auto":
        mode = "sample"
    device = torch.device(device or next(model.parameters()).device)
    with autocast(device, amp):
        probs = task.predict(model, split, device, mode=mode, k=k, seed=seed, flip=flip)
    m = classification_metrics(probs, task.labels(split))
    return {"accuracy": m["accuracy"], "loss": m["nll"], "errors": m["errors"], "images": m["n"]}, probs


def evaluate_run(run: LoadedRun, cfg, device, amp) -> dict:
    """What `attnlab eval` reports for an image run (the whole split, EVAL_BATCH images per pass)."""
    if cfg.data or cfg.context:
        raise UserError("--data and --context apply to language models; an image run is scored on its own data")
    data = load_images(run.data)
    model_shape = (run.model.cfg.channels, run.model.cfg.image_size, run.model.cfg.width)
    if tuple(data.shape) != model_shape or data.num_classes != run.model.cfg.num_classes:
        raise UserError(f"the data at {run.data.path} ({data.num_classes} classes of {list(data.shape)}) is not what "
                        f"the model was trained on ({run.model.cfg.num_classes} classes of {list(model_shape)})")
    task = image_task(data, run.data, EVAL_BATCH, cfg.seed)
    t0 = time.perf_counter()
    split = "val" if cfg.split == "auto" else cfg.split
    metrics, probs = evaluate_split(run.model, task, split, mode=cfg.mode, k=cfg.ensemble, seed=cfg.seed,
                                    device=device, amp=amp, flip=cfg.tta == "flip")
    eval_s = time.perf_counter() - t0
    out = Path(cfg.out) if cfg.out else run.run_dir / "eval"
    labels, pred = task.labels(split), probs.argmax(1)
    parts = [split, cfg.mode]
    if cfg.ensemble > 1:
        parts.append(f"K={cfg.ensemble}")
    if cfg.tta == "flip":
        parts.append("flip-averaged")
    title = ", ".join(parts)
    confusion_matrix_png(out / "confusion_matrix.png", labels, pred, data.classes, title=title)
    misclassified_grid_png(out / "misclassified.png", task.images(split), labels, pred, data.classes,
                           probs=probs, title=title)
    return {"split": split, "tta": cfg.tta, **metrics, "eval_s": eval_s,
            "confusion_matrix": str(out / "confusion_matrix.png"), "misclassified": str(out / "misclassified.png")}


register(Kind("image", ImageRunConfig, build, load, evaluate_run,
              "a Vision Transformer classifying images (IDX files or one sub-folder per class)"))
