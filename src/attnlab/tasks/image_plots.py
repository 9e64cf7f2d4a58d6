"""Pictures of a classifier's predictions: a confusion matrix with counts, and a grid of misclassified images."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts: row = true class, column = predicted class."""
    labels, predictions = labels.cpu().long(), predictions.cpu().long()
    flat = torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes)


def _figure(width: float, height: float):
    # A Figure with its own Agg canvas: no pyplot state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def confusion_matrix_png(path, labels: torch.Tensor, predictions: torch.Tensor, class_names: list[str], *,
                         title: str | None = None) -> torch.Tensor:
    """Write the confusion matrix of `predictions` against `labels` to `path` (PNG): true classes down,
    predicted across, the count in every cell, shaded by the fraction of its true class. Returns the counts."""
    n = len(class_names)
    cm = confusion_matrix(labels, predictions, n)
    rows = cm.double() / cm.sum(1, keepdim=True).clamp(min=1)
    side = max(4.5, 0.62 * n + 2.2)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    size = 9 if n <= 12 else max(5, 9 - (n - 12) // 4)
    for i in range(n):
        for j in range(n):
            count = int(cm[i, j])
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=size,
                        color="white" if rows[i, j] > 0.5 else "black")
    acc = float(cm.diag().sum()) / max(int(cm.sum()), 1)
    ax.set_title(f"{title + ': ' if title else ''}accuracy {acc:.2%} of {int(cm.sum())} images")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return cm


def misclassified_grid_png(path, images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor,
                           class_names: list[str], *, probs: torch.Tensor | None = None, max_images: int = 36,
                           title: str | None = None) -> int:
    """Write a grid of misclassified images (uint8 [N, C, H, W], as stored) to `path` (PNG), each captioned
    with its true and predicted class. With `probs` [N, C] the most confident mistakes come first and each
    caption gives the predicted probability. Returns how many images were misclassified in all."""
    labels, predictions = labels.cpu(), predictions.cpu()
    wrong = torch.nonzero(labels != predictions).flatten()
    if probs is not None and len(wrong):
        conf = probs.cpu()[wrong, predictions[wrong]]
        wrong = wrong[torch.argsort(conf, descending=True, stable=True)]
    shown = wrong[:max_images]
    cols = max(1, min(6, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    fig = _figure(2.0 * cols, 2.25 * rows + 0.5)
    heading = f"{len(wrong)} of {len(labels)} images misclassified"
    if len(wrong) > len(shown):
        heading += f" ({len(shown)} shown{', most confident first' if probs is not None else ''})"
    fig.suptitle(f"{title}: {heading}" if title else heading, fontsize=10)
    if not len(shown):
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    for slot, i in enumerate(shown.tolist()):
        ax = fig.add_subplot(rows, cols, slot + 1)
        img = images[i].cpu()
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
        caption = f"true: {class_names[int(labels[i])]}\npred: {class_names[int(predictions[i])]}"
        if probs is not None:
            caption += f" ({float(probs[i, predictions[i]]):.2f})"
        ax.set_title(caption, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return len(wrong)
