"""The image kind through the CLI: `attnlab train --task image` and `attnlab eval` on tiny generated IDX files
and class folders, and every kind of bad input as one line and exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from attnlab.cli import main
from attnlab.data.images import load_images, write_idx
from attnlab.run.load import load_run

TINY = ["--model.patch_size", "2", "--model.d_model", "16", "--model.n_layer", "1", "--model.n_head", "2",
        "--train.steps", "6", "--train.batch_size", "16", "--train.eval_every", "6", "--train.tensorboard",
        "false", "--train.progress", "false", "--optim.warmup_steps", "2", "--optim.lr", "3e-3"]


def _bars(n, seed, size=8, classes=3):
    """Class c lights rows 2c and 2c+1 of a noisy image: a task a tiny ViT learns in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.integers(0, 40, (n, size, size))
    for i, c in enumerate(y):
        x[i, 2 * c: 2 * c + 2] += 200
    return x.astype(np.uint8), y.astype(np.uint8)


def _idx_folder(root, n_train=96, n_test=30):
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        x, y = _bars(n, seed)
        write_idx(root / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", y)
    return root


def _class_folder(root, per_class=8, size=(8, 8)):
    x, y = _bars(3 * per_class * 2, 2)
    names = ["bolt", "cog", "nut"]
    counts = dict.fromkeys(range(3), 0)
    for img, c in zip(x, y):
        if counts[int(c)] < per_class:
            path = root / names[int(c)] / f"{counts[int(c)]}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).resize(size).save(path)
            counts[int(c)] += 1
    return root


def _last_json(out: str) -> dict:
    return json.loads(out[out.rindex("{\n"):])


def test_idx_data_trains_and_evaluates_on_every_split(tmp_path, capsys):
    data, run = _idx_folder(tmp_path / "idx"), tmp_path / "run"
    assert main(["train", "--task", "image", "--data.path", str(data), "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(run), "--split", "test"]) == 0
    res = _last_json(capsys.readouterr().out)
    assert res["task"] == "image" and res["split"] == "test" and res["images"] == 30
    # The reported figures are the definitions, recomputed from the loaded model on the test IDX files.
    loaded = load_run(run)
    stats = load_images(loaded.data)  # the training split's mean and std (tested with the data)
    x, y = _bars(30, 1)
    yt = torch.from_numpy(y.astype(np.int64))
    with torch.no_grad():
        logits = loaded.model.eval()(stats.normalize(torch.from_numpy(x)[:, None])).double()
    assert res["accuracy"] == pytest.approx(float((logits.argmax(1) == yt).double().mean()), abs=1e-12)
    assert res["errors"] == int((logits.argmax(1) != yt).sum())
    assert res["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, yt)), rel=1e-5)
    for png in ("confusion_matrix.png", "misclassified.png"):
        assert (run / "eval" / png).stat().st_size > 0
    # Exact attention is deterministic: a dense self-ensemble is the single pass, and so is mode sample.
    assert main(["eval", "--ckpt", str(run), "--split", "test", "--mode", "sample", "--ensemble", "3",
                 "--out", str(tmp_path / "pics")]) == 0
    ens = _last_json(capsys.readouterr().out)
    assert ens["accuracy"] == res["accuracy"] and ens["loss"] == pytest.approx(res["loss"], rel=1e-5)
    assert (tmp_path / "pics" / "confusion_matrix.png").is_file()
    assert main(["eval", "--ckpt", str(run), "--split", "val"]) == 0
    assert _last_json(capsys.readouterr().out)["images"] == round(0.1 * 96)
    # --tta flip: the mean of the class probabilities of each test image and of its mirror image.
    assert main(["eval", "--ckpt", str(run), "--split", "test", "--tta", "flip"]) == 0
    tta = _last_json(capsys.readouterr().out)
    with torch.no_grad():
        mirrored = loaded.model(stats.normalize(torch.from_numpy(x)[:, None]).flip(-1)).double()
    p = (logits.softmax(-1) + mirrored.softmax(-1)) / 2
    assert tta["tta"] == "flip" and tta["errors"] == int((p.argmax(1) != yt).sum())
    assert tta["loss"] == pytest.approx(float(-p.gather(1, yt[:, None]).log().mean()), rel=1e-5)


def test_a_class_folder_trains_and_evaluates_with_the_same_commands(tmp_path, capsys):
    data, run = _class_folder(tmp_path / "parts"), tmp_path / "run"
    assert main(["train", "--task", "image", "--data.path", str(data), "--data.val_fraction", "0.25",
                 "--out", str(run), *TINY]) == 0
    assert "model:" in capsys.readouterr().out
    record = load_run(run).record
    assert record["run"]["task"] == "image" and record["run"]["model"]["num_classes"] == 3
    assert main(["eval", "--ckpt", str(run)]) == 0
    res = _last_json(capsys.readouterr().out)
    assert res["images"] == 6 and 0.0 <= res["accuracy"] <= 1.0
    assert main(["eval", "--ckpt", str(run), "--split", "test"]) == 2
    assert "no 'test' split" in capsys.readouterr().err


def _fails(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and match in err, err


def test_bad_image_input_is_one_line_and_exit_2(tmp_path, capsys):
    train = ["train", "--task", "image", "--out", str(tmp_path / "r"), *TINY, "--data.path"]
    _fails(capsys, [*train, str(tmp_path / "absent")], "image data not found")
    (tmp_path / "empty").mkdir()
    _fails(capsys, [*train, str(tmp_path / "empty")], "no images found")
    cut = _class_folder(tmp_path / "cut", size=(40, 40))
    whole = (cut / "cog" / "1.png").read_bytes()
    (cut / "cog" / "1.png").write_bytes(whole[: len(whole) // 2])
    _fails(capsys, [*train, str(cut)], "cannot read image")
    hollow = _class_folder(tmp_path / "hollow")
    (hollow / "washer").mkdir()
    _fails(capsys, [*train, str(hollow)], "has no images")
    mixed = _class_folder(tmp_path / "mixed")
    Image.fromarray(np.zeros((9, 7), np.uint8)).save(mixed / "nut" / "odd.png")
    _fails(capsys, [*train, str(mixed)], "different sizes")
    magic = _idx_folder(tmp_path / "magic")
    x, _ = _bars(96, 0)
    write_idx(magic / "train-labels-idx1-ubyte.gz", x)  # images where labels belong: magic 0x803
    _fails(capsys, [*train, str(magic)], "magic number")
    ok = str(_idx_folder(tmp_path / "ok"))
    _fails(capsys, [*train, ok, "--model.patch_size", "3"], "not divisible")
    _fails(capsys, [*train, ok, "--model.patch_kernel", "1"], "patch_kernel")
    _fails(capsys, [*train, ok, "--label_smoothing", "1.5"], "label_smoothing")


def test_a_language_model_refuses_the_test_split(tmp_path, capsys):
    run = tmp_path / "lm"
    assert main(["train", "--out", str(run), "--data.source", "induction", "--model.vocab_size", "16",
                 "--model.n_layer", "1", "--model.d_model", "16", "--model.n_head", "2", "--model.max_seq_len", "16",
                 "--train.steps", "1", "--train.batch_size", "2", "--train.tensorboard", "false",
                 "--train.progress", "false", "--data.eval_batches", "1"]) == 0
    capsys.readouterr()
    _fails(capsys, ["eval", "--ckpt", str(run), "--split", "test"], "no test split")
    _fails(capsys, ["eval", "--ckpt", str(run), "--tta", "flip"], "--tta applies to image runs")
    _fails(capsys, ["eval", "--ckpt", str(run), "--tta", "rotate"], "tta")


def test_the_fashion_mnist_recipe_loads_and_names_no_data_path():
    from pathlib import Path

    from attnlab.config import from_dict, load_yaml
    from attnlab.run.image import ImageRunConfig

    raw = load_yaml(Path(__file__).parents[2] / "configs" / "vit_fashion_mnist.yaml")
    cfg = from_dict(ImageRunConfig, raw)
    assert cfg.task == "image" and cfg.data.path == "" and not cfg.out.startswith("/")
    assert 28 % cfg.model.patch_size == 0 and cfg.train.steps * cfg.train.batch_size > 54000  # more than an epoch


def test_the_checkpoint_records_label_smoothing_and_resume_refuses_a_change(tmp_path, capsys):
    data, run = str(_idx_folder(tmp_path / "idx")), tmp_path / "run"
    train = ["train", "--task", "image", "--data.path", data, "--out", str(run), *TINY]
    assert main([*train, "--label_smoothing", "0.1"]) == 0
    assert load_run(run).record["run"]["label_smoothing"] == 0.1
    capsys.readouterr()
    _fails(capsys, [*train, "--label_smoothing", "0.2", "--train.resume", "true", "--train.steps", "8"],
           "label_smoothing 0.1 -> 0.2")
