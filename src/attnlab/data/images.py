"""Labelled images from local files, held as uint8 tensors: IDX files (the MNIST / Fashion-MNIST format) or a
folder with one sub-folder per class. No network.

    data = load_images(ImageDataConfig(path="/usr/share/datasets/fashion-mnist"))
    x, y = data.split("train")                      # uint8 [N, C, H, W], int64 [N]
    batch = data.normalize(augment(x[:64], g, crop_padding=3, flip=True))

Splits: "train", "val" and, where the data has one, "test". Without a validation set of its own the data's
training images are split by `split_seed`, stratified by class. IDX data with `val_fraction=0` validates on the
test files (t10k). Normalisation statistics (per-channel mean and std, in [0, 1] units) come from the images
of the training split only, after `limit_train`.

Augmentation is a pair of tensor ops driven by an explicit generator, so a batch is a function of the
generator's seed: random crop with zero padding (a shift by up to `crop_padding` pixels each way, the
uncovered border black) and an optional horizontal flip of half the images.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..errors import UserError

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, three dimensions (count, rows, columns)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, one dimension (count)
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
_IDX_NAME = re.compile(r"^(train|t10k)-(images|labels)[.-]idx[13]-ubyte(\.gz)?$")


@dataclass
class ImageDataConfig:
    """Where the images are and how they are split, sized and augmented."""

    path: str = ""
    """a folder of IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...), an IDX
    images file, or a folder with one sub-folder per class (optionally inside train/, val/ and test/)"""
    format: Literal["auto", "idx", "folder"] = "auto"
    """auto: IDX when path is a file or holds IDX training files, else class folders"""
    labels: str = ""
    """the IDX labels file of an images file (default: its name with images-idx3 replaced by labels-idx1)"""
    test_path: str = ""
    """an IDX images file to use as the test split"""
    test_labels: str = ""
    """its labels file (default: guessed from its name)"""
    val_fraction: float = 0.1
    """share of the training images held out for validation (stratified) where the data has no val split;
    0 with IDX test files: validate on the test images"""
    split_seed: int = 0
    """seed of the validation split and of the limit_* subsets"""
    image_size: int = 0
    """0: the native size (images of mixed sizes are refused); N: every image resized to N × N"""
    augment: bool = True
    """random crops (and flips, see flip) of the training images"""
    flip: bool = True
    """mirror half of the training images left-right (with augment)"""
    crop_padding: int | None = None
    """largest shift of the random crop in pixels; null: image height // 8 (3 for 28×28); 0: no crop"""
    limit_train: int = 0
    """train on a random subset of this many images; 0: all"""
    limit_val: int = 0
    """validate on a random subset of this many images; 0: all"""
    class_names: list[str] = field(default_factory=list)
    """names for IDX labels 0, 1, ... (default: Fashion-MNIST's when the path mentions "fashion", else the
    label numbers); folder classes are named by their sub-folders"""

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("image_size", "limit_train", "limit_val"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be 0 or positive, got {getattr(self, name)}")
        if self.crop_padding is not None and self.crop_padding < 0:
            raise UserError(f"crop_padding must be 0 or positive, got {self.crop_padding}")
        if self.format not in ("auto", "idx", "folder"):
            raise UserError(f"format must be auto, idx or folder, got {self.format!r}")


@dataclass
class ImageDataset:
    """Splits of uint8 images [N, C, H, W] with int64 labels [N], class names, and the training split's
    per-channel mean and std in [0, 1] units."""

    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]
    classes: list[str]
    mean: torch.Tensor
    std: torch.Tensor
    source: str = ""

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.splits:
            raise UserError(f"image data from {self.source} has no {name!r} split; it has {', '.join(self.splits)}")
        return self.splits[name]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of every image."""
        return tuple(self.splits["train"][0].shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 255] float) images -> float32 with the training split's per-channel mean 0, std 1."""
        mean = self.mean.to(x.device)[:, None, None]
        std = self.std.to(x.device)[:, None, None]
        return (x.float() / 255.0 - mean) / std


# -- IDX ---------------------------------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":  # gzip by content, whatever the name says
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def read_idx(path, kind: Literal["images", "labels"]) -> np.ndarray:
    """An IDX file (gzip or not) of unsigned bytes: images -> uint8 [N, rows, cols], labels -> uint8 [N]."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"IDX {kind} file not found: {p}")
    raw = _read_bytes(p)
    want = IDX_IMAGES_MAGIC if kind == "images" else IDX_LABELS_MAGIC
    ndim = 3 if kind == "images" else 1
    if len(raw) < 4:
        raise UserError(f"{p} is not an IDX {kind} file: only {len(raw)} bytes")
    magic = int.from_bytes(raw[:4], "big")
    if magic != want:
        raise UserError(f"{p} is not an IDX {kind} file: magic number 0x{magic:08x}, expected 0x{want:08x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{p} is truncated: its header needs {header} bytes, the file has {len(raw)}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise UserError(f"{p} holds {len(raw) - header} bytes of data but its header {dims} says {size}; "
                        "the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def write_idx(path, array: np.ndarray) -> None:
    """Write uint8 images [N, rows, cols] or labels [N] as IDX, gzip-compressed when the name ends in .gz."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    if a.ndim not in (1, 3):
        raise ValueError(f"IDX images are [N, rows, cols] and labels [N]; got shape {a.shape}")
    data = (0x800 + a.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in a.shape) + a.tobytes()
    p = Path(path)
    with (gzip.open(p, "wb") if p.name.endswith(".gz") else open(p, "wb")) as f:
        f.write(data)


def _idx_in(folder: Path, split: str, kind: str) -> Path | None:
    found = sorted((f for f in folder.iterdir() if (m := _IDX_NAME.match(f.name)) and m[1] == split and m[2] == kind),
                   key=lambda f: f.name.endswith(".gz"))  # the uncompressed copy first when both are there
    return found[0] if found else None


def _labels_beside(images: Path) -> Path:
    name = re.sub(r"images([.-])idx3", r"labels\1idx1", images.name)
    if name == images.name:
        raise UserError(f"cannot guess the labels file of {images}; name it with labels")
    return images.with_name(name)


def _idx_pair(images: Path, labels: Path) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = read_idx(images, "images"), read_idx(labels, "labels")
    if len(x) != len(y):
        raise UserError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    return torch.from_numpy(x.copy())[:, None], torch.from_numpy(y.astype(np.int64))


def _load_idx(cfg: ImageDataConfig, root: Path) -> dict:
    test = None
    if root.is_dir():
        images, labels = _idx_in(root, "train", "images"), _idx_in(root, "train", "labels")
        if images is None or labels is None:
            raise UserError(f"no IDX training files in {root} (want train-images-idx3-ubyte[.gz] and "
                            "train-labels-idx1-ubyte[.gz])")
        t_img, t_lab = _idx_in(root, "t10k", "images"), _idx_in(root, "t10k", "labels")
        if t_img is not None and t_lab is not None:
            test = (t_img, t_lab)
    else:
        images = root
        labels = Path(cfg.labels).expanduser() if cfg.labels else _labels_beside(images)
    if cfg.test_path:
        t_img = Path(cfg.test_path).expanduser()
        test = (t_img, Path(cfg.test_labels).expanduser() if cfg.test_labels else _labels_beside(t_img))
    splits = {"train": _idx_pair(images, labels)}
    if test is not None:
        splits["test"] = _idx_pair(*test)
    return splits


def _idx_class_names(cfg: ImageDataConfig, root: Path, splits: dict) -> list[str]:
    n = int(max(int(y.max()) for _, y in splits.values() if len(y))) + 1
    if cfg.class_names:
        if len(cfg.class_names) < n:
            raise UserError(f"class_names names {len(cfg.class_names)} classes but the labels go up to {n - 1}")
        return list(cfg.class_names)
    if "fashion" in str(root.resolve()).lower() and n <= len(FASHION_MNIST_CLASSES):
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(max(n, 2))]


# -- splitting, statistics, augmentation -------------------------------------------------------------------

def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices), sorted: about `fraction` of every class goes to validation (at least one
    image of a class with two or more, and never its last one)."""
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        val.append(idx[:k])
        train.append(idx[k:])
    cat = lambda parts: torch.from_numpy(np.sort(np.concatenate(parts)).astype(np.int64))  # noqa: E731
    return cat(train), cat(val)


def _subset(x, y, limit: int, seed: int):
    if not limit or limit >= len(y):
        return x, y
    keep = torch.from_numpy(np.sort(np.random.default_rng(seed).permutation(len(y))[:limit]))
    return x[keep], y[keep]


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of uint8 images [N, C, H, W] in [0, 1] units, exact: from a
    256-bin histogram per channel in float64, so no float copy of the images is made."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        hist = torch.bincount(x[:, c].reshape(-1).to(torch.int64), minlength=256).to(torch.float64)
        p = hist / hist.sum()
        m = (p * values).sum()
        means.append(m)
        stds.append(((p * (values - m) ** 2).sum()).sqrt())
    return torch.stack(means).float(), torch.stack(stds).float().clamp(min=1e-3)


def augment(x: torch.Tensor, g: torch.Generator, *, crop_padding: int = 0, flip: bool = False) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip of images [B, C, H, W] (any dtype, same out).

    Each image is shifted by (dy, dx), both uniform in [-crop_padding, crop_padding], the uncovered border set
    to 0 (what cropping an H×W window out of the zero-padded image does), then mirrored left-right with
    probability 1/2 when `flip`. All randomness comes from `g`, drawn on the CPU.
    """
    b, c, h, w = x.shape
    p = crop_padding
    if p > 0:
        dy = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
                   rows, cols]
    if flip:
        mirror = (torch.rand(b, generator=g) < 0.5).to(x.device)
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x


# -- loading -----------------------------------------------------------------------------------------------

def load_images(cfg: ImageDataConfig) -> ImageDataset:
    """Read, split, resize and subsample the images `cfg` names; every problem is one UserError line."""
    from .image_folder import load_folder

    if not cfg.path:
        raise UserError("no image data given: set path to a folder of IDX files or of class sub-folders")
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise UserError(f"image data not found: {root}")
    fmt = cfg.format
    if fmt == "auto":
        fmt = "idx" if root.is_file() or (_idx_in(root, "train", "images") is not None) else "folder"
    if fmt == "idx":
        splits = _load_idx(cfg, root)
        classes = _idx_class_names(cfg, root, splits)
        if cfg.image_size:
            splits = {k: (_resize(x, cfg.image_size), y) for k, (x, y) in splits.items()}
    else:
        if cfg.class_names:
            raise UserError("class_names applies to IDX data; a folder's classes are named by its sub-folders")
        splits, classes = load_folder(root, cfg.image_size)
    if "val" not in splits:
        if cfg.val_fraction > 0:
            x, y = splits["train"]
            tr, va = stratified_split(y, cfg.val_fraction, cfg.split_seed)
            splits["train"], splits["val"] = (x[tr], y[tr]), (x[va], y[va])
        elif "test" in splits:
            splits["val"] = splits["test"]
        else:
            raise UserError(f"{root} has no validation or test images; set val_fraction above 0")
    splits["train"] = _subset(*splits["train"], cfg.limit_train, cfg.split_seed + 1)
    splits["val"] = _subset(*splits["val"], cfg.limit_val, cfg.split_seed + 2)
    for name, (x, y) in splits.items():
        if len(y) == 0:
            raise UserError(f"the {name} split of {root} is empty; lower val_fraction or add images")
    mean, std = channel_stats(splits["train"][0])
    order = ["train", "val"] + (["test"] if "test" in splits else [])
    return ImageDataset({k: splits[k] for k in order}, classes, mean, std, str(root))


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, C, size, size], bilinear with antialiasing (as Pillow resizes)."""
    if x.shape[-2:] == (size, size):
        return x
    chunks = []
    for part in x.split(4096):  # bounds the float copy
        out = torch.nn.functional.interpolate(part.float(), size=(size, size), mode="bilinear", antialias=True,
                                              align_corners=False)
        chunks.append(out.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(chunks)
