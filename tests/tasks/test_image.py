"""Image classification task: deterministic batches, whole-split evaluation, predictions, pictures, learning."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from attnlab.attention import AttentionSpec
from attnlab.data.images import ImageDataConfig, ImageDataset, channel_stats
from attnlab.errors import UserError
from attnlab.inference.ensemble import attention_mode
from attnlab.models.vit import ViT
from attnlab.tasks.image import (
    ImageClassificationTask,
    classification_metrics,
    confusion_matrix,
    confusion_matrix_png,
    misclassified_grid_png,
)
from attnlab.training import OptimConfig, TrainConfig, train


def _quadrants(n, seed, size=8):
    """Class c = which quadrant (row-major) is lit: bright noise there, dark noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randint(0, 60, (n, 1, size, size), generator=g)
    h = size // 2
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 2)
        x[i, :, r * h:(r + 1) * h, col * h:(col + 1) * h] += 150 + torch.randint(0, 40, (1, h, h), generator=g)
    return x.to(torch.uint8), y


def _dataset(n_train=256, n_val=64):
    tr, va = _quadrants(n_train, 0), _quadrants(n_val, 1)
    mean, std = channel_stats(tr[0])
    return ImageDataset({"train": tr, "val": va}, ["top-left", "top-right", "bottom-left", "bottom-right"],
                        mean, std, "quadrants")


def _vit(task, seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(patch_size=4, d_model=32, n_layer=1, n_head=2)
    return ViT(task.vit_config(**(base | kw)))


def test_batches_are_deterministic_normalised_training_images():
    data = _dataset()
    task = ImageClassificationTask(data, batch_size=16, seed=3, augment=False)
    b = task.batch(5, 0, 0, "cpu")
    assert b["x"].shape == (16, 1, 8, 8) and b["x"].dtype == torch.float32 and b["y"].shape == (16,)
    assert all(torch.equal(b[k], task.batch(5, 0, 0, "cpu")[k]) for k in b)
    for other in [(6, 0, 0), (5, 1, 0), (5, 0, 1)]:
        assert not torch.equal(b["x"], task.batch(*other, "cpu")["x"])
    train_x, train_y = data.split("train")
    pool = data.normalize(train_x)
    for x, y in zip(b["x"], b["y"]):
        same = [i for i in range(len(pool)) if torch.equal(pool[i], x)]
        assert same and all(train_y[i] == y for i in same)
    augmented = ImageClassificationTask(data, batch_size=16, seed=3, crop_padding=1, flip=True)
    a = augmented.batch(5, 0, 0, "cpu")
    assert torch.equal(a["y"], b["y"]) and not torch.equal(a["x"], b["x"])  # same images, moved
    assert torch.equal(a["x"], augmented.batch(5, 0, 0, "cpu")["x"])


def test_evaluate_and_eval_batches_cover_the_whole_split():
    data = _dataset(n_val=20)
    task = ImageClassificationTask(data, batch_size=8, eval_batch_size=7)
    batches = list(task.eval_batches("val"))
    assert [len(b["y"]) for b in batches] == [7, 7, 6]
    assert torch.equal(torch.cat([b["y"] for b in batches]), data.split("val")[1])
    assert len(list(task.eval_batches("val", limit=2))) == 2 and len(task.labels("val", limit=2)) == 14
    model = _vit(task).eval()
    x, y = data.split("val")
    losses, hits = [], []
    for i in range(len(y)):  # one image at a time: nothing depends on how the split is batched
        with torch.no_grad():
            logits = model(data.normalize(x[i:i + 1])).double()
        losses.append(float(F.cross_entropy(logits, y[i:i + 1])))
        hits.append(int(logits.argmax()) == int(y[i]))
    metrics = task.evaluate(model, "cpu")
    assert metrics["val_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(np.mean(hits))


def test_predict_single_pass_and_self_ensemble():
    data = _dataset(n_val=12)
    task = ImageClassificationTask(data, batch_size=8, eval_batch_size=5)
    model = _vit(task).eval()
    x = data.normalize(data.split("val")[0])
    with torch.no_grad():
        want = F.softmax(model(x), -1)
    torch.testing.assert_close(task.predict(model, "val"), want)
    ssa = _vit(task, attention=AttentionSpec(name="ssa", options={"factor": 2})).eval()
    state = torch.get_rng_state()
    p4 = task.predict(ssa, "val", mode="sample", k=4, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # predictions leave the caller's random stream alone
    torch.testing.assert_close(p4.sum(-1), torch.ones(12))
    assert torch.equal(p4, task.predict(ssa, "val", mode="sample", k=4, seed=0))
    assert not torch.equal(p4, task.predict(ssa, "val", mode="sample", k=4, seed=1))
    assert all(k.mode == "auto" for k in ssa.modules() if hasattr(k, "mode"))
    with attention_mode(ssa, "dense"), torch.no_grad():
        dense = F.softmax(ssa(x), -1)
    torch.testing.assert_close(task.predict(ssa, "val", mode="dense", k=8), dense)
    with pytest.raises(UserError, match="at least 1"):
        task.predict(model, "val", k=0)
    with pytest.raises(UserError, match="no 'test' split"):
        task.predict(model, "test")


def test_flip_averaged_predictions_do_not_change_when_the_images_are_mirrored():
    data = _dataset(n_val=12)
    x, y = data.split("val")
    mirrored = ImageDataset({"train": data.split("train"), "val": (x.flip(-1), y)}, data.classes, data.mean,
                            data.std, "mirrored")
    task, task_m = (ImageClassificationTask(d, batch_size=8, eval_batch_size=5) for d in (data, mirrored))
    model = _vit(task).eval()
    plain, plain_m = task.predict(model, "val"), task_m.predict(model, "val")
    assert not torch.allclose(plain, plain_m)  # the model itself is not mirror-symmetric
    torch.testing.assert_close(task.predict(model, "val", flip=True), (plain + plain_m) / 2)
    torch.testing.assert_close(task.predict(model, "val", flip=True), task_m.predict(model, "val", flip=True))


def test_classification_metrics_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]])
    labels = torch.tensor([0, 1, 1, 2])
    m = classification_metrics(probs, labels)
    assert m["accuracy"] == 0.5 and m["errors"] == 2 and m["n"] == 4
    assert m["nll"] == pytest.approx(-(np.log(0.7) + np.log(0.3) + np.log(0.4) + np.log(0.6)) / 4)


def test_confusion_matrix_and_pictures(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (50,), generator=g)
    preds = torch.where(torch.rand(50, generator=g) < 0.7, labels, torch.randint(0, 4, (50,), generator=g))
    want = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in zip(labels.tolist(), preds.tolist()):
        want[t, p] += 1
    assert torch.equal(confusion_matrix(labels, preds, 4), want)
    names = ["top-left", "top-right", "bottom-left", "bottom-right"]
    cm = confusion_matrix_png(tmp_path / "cm.png", labels, preds, names, title="val")
    assert torch.equal(cm, want)
    images, _ = _quadrants(50, 2)
    probs = F.one_hot(preds, 4).float() * 0.6 + 0.1
    shown = misclassified_grid_png(tmp_path / "sub" / "wrong.png", images, labels, preds, names, probs=probs,
                                   max_images=6)
    assert shown == int((labels != preds).sum()) > 6
    none = misclassified_grid_png(tmp_path / "none.png", images, labels, labels, names)
    assert none == 0
    for name in ("cm.png", "sub/wrong.png", "none.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and min(im.size) > 200


@pytest.mark.parametrize("pos", ["learned", "none"])
def test_a_tiny_vit_learns_which_quadrant_is_lit(pos):
    # Without positions the ViT sees its patches as a set, so which quadrant is lit is invisible to it.
    data = _dataset()
    task = ImageClassificationTask(data, batch_size=32, seed=0, augment=False)
    model = _vit(task, pos=pos)
    cfg = TrainConfig(steps=60, batch_size=32, eval_every=0, log_every=100, seed=0, device="cpu", progress=False,
                      tensorboard=False)
    result = train(model, task, cfg, OptimConfig(lr=3e-3, warmup_steps=5, weight_decay=0.0))
    if pos == "learned":
        assert result.final["accuracy"] >= 0.95
    else:
        assert result.final["accuracy"] <= 0.4


def test_from_config_reads_a_folder_and_sizes_the_model(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("dark", "light"):
        for i in range(6):
            base = 30 if c == "dark" else 220
            a = np.clip(base + rng.integers(-20, 20, (6, 6, 3)), 0, 255).astype(np.uint8)
            (tmp_path / c).mkdir(exist_ok=True)
            Image.fromarray(a).save(tmp_path / c / f"{i}.png")
    task = ImageClassificationTask.from_config(ImageDataConfig(path=str(tmp_path), val_fraction=0.34, image_size=8),
                                               batch_size=4, seed=1)
    assert task.classes == ["dark", "light"] and task.crop_padding == 1
    cfg = task.vit_config(patch_size=4, d_model=16, n_head=2, n_layer=1)
    assert (cfg.channels, cfg.image_size, cfg.num_classes) == (3, 8, 2)
    model = ViT(cfg)
    loss, count = task.loss(model, task.batch(0, 0, 0, "cpu"))
    assert count == 4 and torch.isfinite(loss)
    with pytest.raises(UserError, match="batch sizes"):
        ImageClassificationTask(task.data, batch_size=0)
    with pytest.raises(UserError, match="label_smoothing"):
        ImageClassificationTask(task.data, batch_size=4, label_smoothing=1.0)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_training_loss_is_cross_entropy_against_smoothed_targets(eps):
    # By hand in float64: q = (1 − ε)·onehot(y) + ε/C, loss = −Σ q·log softmax(logits), averaged over the batch.
    task = ImageClassificationTask(_dataset(), batch_size=16, seed=3, label_smoothing=eps)
    model = _vit(task).double()
    batch = task.batch(0)
    batch["x"] = batch["x"].double()
    loss, count = task.loss(model, batch)
    logp = torch.log_softmax(model(batch["x"]), -1)
    q = (1 - eps) * F.one_hot(batch["y"], 4).double() + eps / 4
    assert count == 16
    torch.testing.assert_close(loss.double(), -(q * logp).sum(-1).mean())
