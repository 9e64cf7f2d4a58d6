"""Image classification for the trainer: augmented training batches, whole-split evaluation, and the
predictions and pictures that `attnlab eval` reports.

    data = load_images(ImageDataConfig(path=...))
    task = ImageClassificationTask(data, batch_size=128, seed=0)
    model = ViT(task.vit_config(patch_size=4, d_model=128, ...))
    train(model, task, TrainConfig(...))
    probs = task.predict(model, "test", device, mode="sample", k=8)

Training batches are drawn with replacement, each index and each augmentation from
`batch_generator(seed, step, micro, rank)`: a batch is a function of those four numbers, so a resumed run
sees exactly the batches the interrupted one would have.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from ..data.images import ImageDataConfig, ImageDataset, augment, load_images
from ..errors import UserError
from ..inference.ensemble import ensemble_classify
from ..training.trainer import batch_generator
from .image_plots import confusion_matrix, confusion_matrix_png, misclassified_grid_png

__all__ = ["ImageClassificationTask", "check_label_smoothing", "classification_metrics", "confusion_matrix",
           "confusion_matrix_png", "misclassified_grid_png"]


def check_label_smoothing(eps: float) -> float:
    """`eps` if it is a usable label-smoothing amount, else a one-line UserError."""
    if not 0.0 <= eps < 1.0:
        raise UserError(f"label_smoothing must be in [0, 1), got {eps}")
    return eps


class ImageClassificationTask:
    """Classify the images of an `ImageDataset`; batches are {"x": float [B, C, H, W] normalised, "y": [B]}."""

    def __init__(self, data: ImageDataset, batch_size: int, seed: int = 0, *, augment: bool = True,
                 flip: bool = True, crop_padding: int | None = None, eval_batch_size: int = 256,
                 label_smoothing: float = 0.0):
        if batch_size < 1 or eval_batch_size < 1:
            raise UserError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}")
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.eval_batch_size = eval_batch_size
        self.augment = augment
        self.flip = flip
        self.crop_padding = data.shape[1] // 8 if crop_padding is None else crop_padding
        if self.crop_padding < 0:
            raise UserError(f"crop_padding must be 0 or positive, got {crop_padding}")

    @classmethod
    def from_config(cls, cfg: ImageDataConfig, batch_size: int, seed: int = 0,
                    eval_batch_size: int = 256) -> "ImageClassificationTask":
        return cls(load_images(cfg), batch_size, seed, augment=cfg.augment, flip=cfg.flip,
                   crop_padding=cfg.crop_padding, eval_batch_size=eval_batch_size)

    @property
    def classes(self) -> list[str]:
        return self.data.classes

    def vit_config(self, **kwargs):
        """A `ViTConfig` whose image size, channels and classes are this data's; `kwargs` set the rest."""
        from ..models.vit import ViTConfig

        c, h, w = self.data.shape
        return ViTConfig(image_size=h, image_width=0 if w == h else w, channels=c,
                         num_classes=self.data.num_classes, **kwargs)

    # -- training ----------------------------------------------------------------------------------------

    def batch(self, step: int, micro: int = 0, rank: int = 0, device="cpu") -> dict:
        g = batch_generator(self.seed, step, micro, rank)
        x, y = self.data.split("train")
        idx = torch.randint(0, len(y), (self.batch_size,), generator=g)
        images = x[idx]
        if self.augment:
            images = augment(images, g, crop_padding=self.crop_padding, flip=self.flip)
        return {"x": self.data.normalize(images.to(device)), "y": y[idx].to(device)}

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        """Training loss: cross-entropy against targets smoothed by `label_smoothing` (Szegedy et al. 2016)."""
        logits = model(batch["x"])
        loss = F.cross_entropy(logits.float(), batch["y"], label_smoothing=self.label_smoothing)
        return loss, batch["y"].numel()

    # -- evaluation --------------------------------------------------------------------------------------

    def labels(self, split: str = "val", limit: int | None = None) -> torch.Tensor:
        """The labels of `split` in the order `eval_batches` and `predict` visit its images."""
        y = self.data.split(split)[1]
        return y if limit is None else y[: limit * self.eval_batch_size]

    def images(self, split: str = "val", limit: int | None = None) -> torch.Tensor:
        """The raw uint8 images of `split`, in the same order (for pictures of the predictions)."""
        x = self.data.split(split)[0]
        return x if limit is None else x[: limit * self.eval_batch_size]

    def eval_batches(self, split: str = "val", limit: int | None = None) -> Iterator[dict]:
        """The whole of `split` (or its first `limit` batches) in order, normalised, not augmented."""
        x, y = self.data.split(split)
        for i, start in enumerate(range(0, len(y), self.eval_batch_size)):
            if limit is not None and i >= limit:
                return
            stop = start + self.eval_batch_size
            yield {"x": self.data.normalize(x[start:stop]), "y": y[start:stop]}

    @torch.no_grad()
    def evaluate(self, model, device) -> dict[str, float]:
        """Mean cross-entropy and accuracy over every validation image."""
        nll, correct, n = 0.0, 0, 0
        for b in self.eval_batches("val"):
            x, y = b["x"].to(device), b["y"].to(device)
            logits = model(x)
            nll += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            n += len(y)
        return {"val_loss": nll / n, "accuracy": correct / n}

    @torch.no_grad()
    def predict(self, model, split: str = "val", device=None, mode: str | None = None, k: int = 1,
                seed: int | None = None, limit: int | None = None, flip: bool = False) -> torch.Tensor:
        """Class probabilities [N, C] (float32, CPU) of the images of `split`, in order.

        mode: the kernels' attention mode for the passes ("auto", "dense", "sample"; None leaves them as they
        are). k > 1 averages the probabilities of K stochastic passes (a self-ensemble, `ensemble_classify`);
        "dense" is deterministic, so K is taken as 1 there. seed: fixes the passes' random draws. flip: average
        with the probabilities of the left-right mirror images (test-time augmentation).
        """
        if k < 1:
            raise UserError(f"ensemble size must be at least 1, got {k}")
        if mode == "dense":
            k = 1
        device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
        devices = [device] if torch.device(device).type == "cuda" else []
        out = []
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            for b in self.eval_batches(split, limit):
                x = b["x"].to(device)
                probs = ensemble_classify(model, x, k=k, mode=mode).float()
                if flip:
                    probs = (probs + ensemble_classify(model, x.flip(-1), k=k, mode=mode).float()) / 2
                out.append(probs.cpu())
        if not out:
            raise UserError(f"the {split} split has no images to predict")
        return torch.cat(out)


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, mean negative log-likelihood and error count of predicted probabilities [N, C]."""
    labels = labels.to(probs.device)
    p_true = probs.gather(1, labels[:, None]).squeeze(1).double()
    wrong = int((probs.argmax(1) != labels).sum())
    nll = float(-torch.log(p_true.clamp(min=1e-30)).mean())
    return {"accuracy": 1.0 - wrong / len(labels), "nll": nll, "errors": wrong, "n": len(labels)}
