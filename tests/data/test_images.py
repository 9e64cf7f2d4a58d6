"""Image data: IDX files, class folders, splits, statistics from the training split, seeded augmentation."""

import gzip
import itertools
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from attnlab.data.images import (
    FASHION_MNIST_CLASSES,
    ImageDataConfig,
    augment,
    channel_stats,
    load_images,
    read_idx,
    stratified_split,
    write_idx,
)
from attnlab.errors import UserError


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX written by hand from the format's description: 0, 0, type 0x08, rank, big-endian dims, data."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def _rng(seed=0):
    return np.random.default_rng(seed)


def _write_mnist_like(folder, n_train=40, n_test=12, classes=3, gz=True, seed=0):
    rng = _rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 6, 5), dtype=np.uint8)
        y = (np.arange(n) % classes).astype(np.uint8)
        opener = gzip.open if gz else open
        with opener(folder / f"{split}-images-idx3-ubyte{sfx}", "wb") as f:
            f.write(_idx_bytes(x))
        with opener(folder / f"{split}-labels-idx1-ubyte{sfx}", "wb") as f:
            f.write(_idx_bytes(y))
        data[split] = (x, y)
    return data


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_read_as_written_by_hand(tmp_path, gz):
    data = _write_mnist_like(tmp_path, gz=gz)
    sfx = ".gz" if gz else ""
    np.testing.assert_array_equal(read_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", "images"), data["train"][0])
    np.testing.assert_array_equal(read_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", "labels"), data["t10k"][1])


@pytest.mark.parametrize("name", ["imgs.idx", "imgs.idx.gz"])
def test_write_idx_round_trip(tmp_path, name):
    x = _rng().integers(0, 256, (7, 4, 3), dtype=np.uint8)
    write_idx(tmp_path / name, x)
    assert (tmp_path / name).read_bytes()[:2] == (b"\x1f\x8b" if name.endswith(".gz") else b"\x00\x00")
    np.testing.assert_array_equal(read_idx(tmp_path / name, "images"), x)
    with pytest.raises(ValueError):
        write_idx(tmp_path / "bad", np.zeros((2, 2), np.uint8))


def test_broken_idx_files_are_one_line_user_errors(tmp_path):
    x = _rng().integers(0, 256, (3, 4, 4), dtype=np.uint8)
    (tmp_path / "imgs").write_bytes(_idx_bytes(x))
    (tmp_path / "labels").write_bytes(_idx_bytes(np.arange(3, dtype=np.uint8)))
    (tmp_path / "short").write_bytes(_idx_bytes(x)[:-5])
    (tmp_path / "junk.gz").write_bytes(b"\x1f\x8b" + b"not really gzip")
    cases = [("imgs", "labels", "magic number 0x00000803, expected 0x00000801"),
             ("labels", "images", "magic number 0x00000801, expected 0x00000803"),
             ("short", "images", "truncated"), ("junk.gz", "images", "cannot read"), ("missing", "images", "not found")]
    for name, kind, match in cases:
        with pytest.raises(UserError, match=match) as e:
            read_idx(tmp_path / name, kind)
        assert "\n" not in str(e.value)


def test_idx_folder_loads_with_test_split_and_held_out_validation(tmp_path):
    data = _write_mnist_like(tmp_path / "digits", n_train=40, classes=4)
    ds = load_images(ImageDataConfig(path=str(tmp_path / "digits"), val_fraction=0.2))
    assert list(ds.splits) == ["train", "val", "test"]
    assert ds.classes == ["0", "1", "2", "3"] and ds.shape == (1, 6, 5)
    (xt, yt), (xv, yv) = ds.split("train"), ds.split("val")
    assert torch.bincount(yv).tolist() == [2, 2, 2, 2] and len(yt) == 32
    # Every training image is in exactly one of train and val, with its own label.
    seen = sorted(map(bytes, [*xt.numpy(), *xv.numpy()]))
    assert seen == sorted(map(bytes, data["train"][0][:, None]))
    lookup = {bytes(x[None]): int(y) for x, y in zip(*data["train"])}
    assert all(lookup[bytes(x.numpy())] == int(y) for x, y in zip(torch.cat([xt, xv]), torch.cat([yt, yv])))
    np.testing.assert_array_equal(ds.split("test")[0][:, 0].numpy(), data["t10k"][0])
    # No held-out fraction: the test files validate.
    ds0 = load_images(ImageDataConfig(path=str(tmp_path / "digits"), val_fraction=0.0))
    assert torch.equal(ds0.split("val")[0], ds0.split("test")[0]) and len(ds0.split("train")[1]) == 40
    with pytest.raises(UserError, match="no 'nope' split"):
        ds.split("nope")


def test_idx_explicit_files_and_class_names(tmp_path):
    _write_mnist_like(tmp_path / "fashion-mnist", gz=False, classes=10, n_train=30)
    img = tmp_path / "fashion-mnist" / "train-images-idx3-ubyte"
    ds = load_images(ImageDataConfig(path=str(img), val_fraction=0.2))
    assert ds.classes == FASHION_MNIST_CLASSES and "test" not in ds.splits
    moved = tmp_path / "elsewhere.lbl"
    moved.write_bytes((tmp_path / "fashion-mnist" / "train-labels-idx1-ubyte").read_bytes())
    names = [f"c{i}" for i in range(10)]
    ds = load_images(ImageDataConfig(path=str(img), labels=str(moved), class_names=names, image_size=4,
                                     test_path=str(tmp_path / "fashion-mnist" / "t10k-images-idx3-ubyte")))
    assert ds.classes == names and ds.shape == (1, 4, 4) and ds.split("test")[0].shape[1:] == (1, 4, 4)
    with pytest.raises(UserError, match="class_names names 3 classes"):
        load_images(ImageDataConfig(path=str(img), class_names=["a", "b", "c"]))
    lonely = tmp_path / "lonely.bin"
    lonely.write_bytes(img.read_bytes())
    with pytest.raises(UserError, match="cannot guess the labels file"):
        load_images(ImageDataConfig(path=str(lonely), format="idx"))


def test_stratified_split_is_seeded_disjoint_and_proportional():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    tr, va = stratified_split(y, 0.2, seed=3)
    assert sorted(tr.tolist() + va.tolist()) == list(range(100))
    assert torch.bincount(y[va]).tolist() == [10, 6, 4]
    tr2, va2 = stratified_split(y, 0.2, seed=3)
    assert torch.equal(va, va2) and not torch.equal(va, stratified_split(y, 0.2, seed=4)[1])
    # A class of two keeps one image on each side; a lone image stays in training.
    _, va = stratified_split(torch.tensor([0, 0, 1]), 0.01, seed=0)
    assert torch.bincount(torch.tensor([0, 0, 1])[va], minlength=2).tolist() == [1, 0]


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _class_folder(root, classes=("cat", "ant", "bee"), per_class=6, size=(5, 4), mode="L", seed=0):
    """Each image's first pixel encodes its class (value 10·class index in sorted order), so labels can be
    checked against content."""
    rng = _rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    for c in classes:
        for i in range(per_class):
            a = rng.integers(0, 256, shape, dtype=np.uint8)
            a.reshape(-1)[0] = 10 * sorted(classes).index(c)
            _png(root / c / f"img{i}.png", a)


def test_class_folders_labels_sorted_and_pixels_exact(tmp_path):
    _class_folder(tmp_path / "pets")
    (tmp_path / "pets" / "README.txt").write_text("not an image")
    (tmp_path / "pets" / "bee" / "notes.txt").write_text("ignored")
    ds = load_images(ImageDataConfig(path=str(tmp_path / "pets"), val_fraction=1 / 3, augment=False))
    assert ds.classes == ["ant", "bee", "cat"] and ds.shape == (1, 4, 5)
    for split in ("train", "val"):
        x, y = ds.split(split)
        assert torch.equal(x[:, 0, 0, 0].long(), 10 * y)
        assert torch.bincount(y).tolist() == ([4, 4, 4] if split == "train" else [2, 2, 2])
    png = np.asarray(Image.open(tmp_path / "pets" / "ant" / "img3.png"))
    x = torch.cat([ds.split("train")[0], ds.split("val")[0]])
    assert any(torch.equal(img[0], torch.from_numpy(png.copy())) for img in x)


def test_train_val_subfolders_and_statistics_from_train_only(tmp_path):
    _class_folder(tmp_path / "d" / "train", per_class=5, seed=1)
    for c in ("ant", "bee", "cat"):
        _png(tmp_path / "d" / "val" / c / "v.png", np.full((4, 5), 250, np.uint8))
    ds = load_images(ImageDataConfig(path=str(tmp_path / "d")))
    assert len(ds.split("train")[1]) == 15 and len(ds.split("val")[1]) == 3
    train = ds.split("train")[0].numpy().astype(np.float64) / 255
    torch.testing.assert_close(ds.mean, torch.tensor([train.mean()], dtype=torch.float32))
    torch.testing.assert_close(ds.std, torch.tensor([train.std()], dtype=torch.float32))
    z = ds.normalize(ds.split("train")[0]).double()
    torch.testing.assert_close(z.mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(unbiased=False), torch.tensor(1.0, dtype=torch.float64), atol=1e-5, rtol=0)


def test_limit_train_subsamples_before_the_statistics(tmp_path):
    _write_mnist_like(tmp_path, n_train=60, classes=3)
    ds = load_images(ImageDataConfig(path=str(tmp_path), limit_train=9, limit_val=4))
    assert len(ds.split("train")[1]) == 9 and len(ds.split("val")[1]) == 4
    assert len(set(ds.split("train")[1].tolist())) > 1  # a random subset, not the first class
    want = ds.split("train")[0].numpy().astype(np.float64) / 255
    torch.testing.assert_close(ds.mean, torch.tensor([want.mean()], dtype=torch.float32))


def test_channel_stats_match_numpy_per_channel():
    x = torch.from_numpy(_rng(5).integers(0, 256, (7, 3, 6, 5), dtype=np.uint8))
    mean, std = channel_stats(x)
    a = x.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean.numpy(), a.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(std.numpy(), a.std(axis=(0, 2, 3)), rtol=1e-6)


def test_modes_and_sizes(tmp_path):
    _class_folder(tmp_path / "mix", classes=("a", "b"), per_class=2)
    rgb = _rng(2).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    _png(tmp_path / "mix" / "b" / "color.png", rgb)
    Image.fromarray(_rng(3).integers(0, 256, (4, 5, 4), dtype=np.uint8), "RGBA").save(tmp_path / "mix" / "a" / "alpha.png")
    ds = load_images(ImageDataConfig(path=str(tmp_path / "mix"), val_fraction=0.25))
    assert ds.shape == (3, 4, 5) and len(ds.mean) == 3
    x = torch.cat([ds.split("train")[0], ds.split("val")[0]])
    assert any(torch.equal(img, torch.from_numpy(rgb).permute(2, 0, 1)) for img in x)
    gray = [img for img in x if torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])]
    assert len(gray) == 4  # the grayscale files, repeated into three equal channels
    # Mixed sizes: refused with the sizes named, or resized on request.
    _png(tmp_path / "mix" / "a" / "big.png", np.zeros((9, 7), np.uint8))
    with pytest.raises(UserError, match=r"different sizes \(5x4: 6 .*7x9: 1 \(e\.g\. big\.png\)\).*image_size"):
        load_images(ImageDataConfig(path=str(tmp_path / "mix")))
    ds = load_images(ImageDataConfig(path=str(tmp_path / "mix"), image_size=6))
    assert ds.shape == (3, 6, 6)
    Image.fromarray(rgb).save(tmp_path / "mix" / "b" / "photo.jpg", quality=90)
    assert load_images(ImageDataConfig(path=str(tmp_path / "mix"), image_size=6)).shape == (3, 6, 6)


def test_folder_problems_are_one_line_user_errors(tmp_path):
    def fails(path, match, **kw):
        with pytest.raises(UserError, match=match) as e:
            load_images(ImageDataConfig(path=str(path), **kw))
        assert "\n" not in str(e.value)

    fails(tmp_path / "absent", "image data not found")
    fails("", "no image data given")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "no images found")
    _png(tmp_path / "flat" / "x.png", np.zeros((3, 3), np.uint8))
    fails(tmp_path / "flat", "no class sub-folders")
    _class_folder(tmp_path / "one", classes=("only",))
    fails(tmp_path / "one", "two or more")
    _class_folder(tmp_path / "hollow", classes=("a", "b"))
    (tmp_path / "hollow" / "c").mkdir()
    (tmp_path / "hollow" / "c" / "x.txt").write_text("no images here")
    fails(tmp_path / "hollow", r"class folder .*c has no images")
    _class_folder(tmp_path / "bad", classes=("a", "b"))
    (tmp_path / "bad" / "a" / "garbage.png").write_bytes(b"this is not a png")
    fails(tmp_path / "bad", r"cannot read image .*garbage\.png")
    _class_folder(tmp_path / "cut", classes=("a", "b"), size=(40, 40))
    whole = (tmp_path / "cut" / "b" / "img1.png").read_bytes()
    (tmp_path / "cut" / "b" / "img1.png").write_bytes(whole[: len(whole) // 2])
    fails(tmp_path / "cut", r"cannot read image .*img1\.png")
    _class_folder(tmp_path / "split" / "train", classes=("a", "b"))
    _class_folder(tmp_path / "split" / "val", classes=("a", "z"))
    fails(tmp_path / "split", r"class folders \['z'\]")
    _class_folder(tmp_path / "ok", classes=("a", "b"))
    fails(tmp_path / "ok", "class_names applies to IDX", class_names=["x", "y"])
    with pytest.raises(UserError, match="val_fraction"):
        ImageDataConfig(path="x", val_fraction=1.0)


def _shift_ref(img, dy, dx):
    """out[y, x] = img[y + dy, x + dx], zero outside: a slow loop."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    for yy in range(h):
        for xx in range(w):
            if 0 <= yy + dy < h and 0 <= xx + dx < w:
                out[:, yy, xx] = img[:, yy + dy, xx + dx]
    return out


def test_augmentation_is_a_seeded_shift_and_mirror():
    x = torch.from_numpy(_rng(7).integers(1, 256, (64, 2, 6, 5), dtype=np.uint8))
    p = 2
    out = augment(x, torch.Generator().manual_seed(11), crop_padding=p, flip=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(11), crop_padding=p, flip=True))
    assert not torch.equal(out, augment(x, torch.Generator().manual_seed(12), crop_padding=p, flip=True))
    shifts, flips = [], 0
    for img, got in zip(x, out):
        matches = []
        for dy, dx, f in itertools.product(range(-p, p + 1), range(-p, p + 1), (False, True)):
            ref = _shift_ref(img, dy, dx)
            if torch.equal(got, ref.flip(-1) if f else ref):
                matches.append((dy, dx, f))
        assert len(matches) == 1, matches  # every output is exactly one shift (and maybe a mirror) of its input
        shifts.append(matches[0][:2])
        flips += matches[0][2]
    assert {dy for dy, _ in shifts} == set(range(-p, p + 1))
    assert 16 <= flips <= 48  # Binomial(64, 1/2): outside this range with probability < 1e-4
    assert torch.equal(augment(x, torch.Generator(), crop_padding=0, flip=False), x)
