"""A folder of images with one sub-folder per class, read with Pillow into uint8 tensors.

Layouts:
    root/<class>/*.png                              split into train/val later, by a seed
    root/train/<class>/...  root/val/<class>/...    (val may also be called valid or validation; test/ too)

Class names are the training split's sub-folder names, sorted. Images may sit in nested folders inside a
class folder. Files whose names do not end in an image suffix are ignored; a file that does but cannot be
decoded (unreadable, truncated, not an image) is an error naming it.

Channels come from the data: one if every image is grayscale, otherwise three, with grayscale images
repeated into R, G and B (what Pillow's L -> RGB conversion does) and alpha dropped. Sizes: with
`image_size` every image is resized (stretched, bilinear) to image_size × image_size; without it, images of
different sizes are refused with the sizes found, since silently cropping or padding would change what the
model sees.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _image_files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames)
                if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(out, key=lambda f: f.relative_to(folder).parts)


def _split_folders(root: Path) -> dict[str, Path]:
    """{"train": folder, ...} for the train/val/test layout, or {"train": root} for class folders at the root.
    A `train` folder holding class folders marks the split layout (a class called "train" holds images)."""
    subs = {d.name.lower(): d for d in _visible_dirs(root)}
    train = subs.get("train")
    if train is None or not _visible_dirs(train):
        return {"train": root}
    found = {"train": train}
    for split in ("val", "test"):
        for alias in _SPLIT_NAMES[split]:
            if alias in subs:
                found[split] = subs[alias]
                break
    return found


def _open(path: Path, image_size: int):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            size, gray = im.size, im.mode in _GRAY_MODES
            im = im.convert("L" if gray else "RGB")
            if image_size:
                im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8), size, gray
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _read_split(folder: Path, classes: list[str] | None, image_size: int):
    """Arrays, labels, original sizes and files of one split; `classes` None: this split defines them."""
    class_dirs = _visible_dirs(folder)
    if not class_dirs:
        if _image_files(folder):
            raise UserError(f"{folder} holds images but no class sub-folders; put each class's images in a "
                            "sub-folder named after the class")
        raise UserError(f"no images found under {folder} (want one sub-folder per class with "
                        f"{', '.join(IMAGE_SUFFIXES)} files)")
    names = [d.name for d in class_dirs]
    if classes is None:
        classes = names
    else:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise UserError(f"{folder} has class folders {unknown} that the training split does not have")
    arrays, labels, sizes, grays, files = [], [], [], [], []
    for d in class_dirs:
        found = _image_files(d)
        if not found:
            raise UserError(f"class folder {d} has no images ({', '.join(IMAGE_SUFFIXES)})")
        for f in found:
            a, size, gray = _open(f, image_size)
            arrays.append(a)
            sizes.append(size)
            grays.append(gray)
            files.append(f)
            labels.append(classes.index(d.name))
    return arrays, labels, sizes, grays, files, classes


def load_folder(root: Path, image_size: int = 0) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """({split: (uint8 [N, C, H, W], int64 [N])}, class names) of the images under `root`."""
    folders = _split_folders(root)
    read, classes = {}, None
    for split, folder in folders.items():
        *parts, classes = _read_split(folder, classes, image_size)
        read[split] = parts
    if len(classes) < 2:
        raise UserError(f"{folders['train']} has one class folder ({classes[0]}); classification needs two or more")
    if not image_size:
        _check_one_size(read)
    color = not all(g for arrays, labels, sizes, grays, files in read.values() for g in grays)
    splits = {}
    for split, (arrays, labels, _, _, _) in read.items():
        x = np.stack([_channels_first(a, color) for a in arrays])
        splits[split] = (torch.from_numpy(x), torch.tensor(labels, dtype=torch.int64))
    return splits, classes


def _channels_first(a: np.ndarray, color: bool) -> np.ndarray:
    if a.ndim == 2:
        a = a[:, :, None]
    if color and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return a.transpose(2, 0, 1)


def _check_one_size(read: dict) -> None:
    sizes = Counter()
    example = {}
    for arrays, labels, found, grays, files in read.values():
        for size, f in zip(found, files):
            sizes[size] += 1
            example.setdefault(size, f)
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}: {n} (e.g. {example[(w, h)].name})" for (w, h), n in sizes.most_common(4))
        more = f" and {len(sizes) - 4} more sizes" if len(sizes) > 4 else ""
        raise UserError(f"images have different sizes ({listed}{more}); set image_size to resize them all "
                        "to one square size")
