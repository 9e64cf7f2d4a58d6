"""The Vision Transformer: shapes, configuration checks, every mechanism, symmetry, positions, KV-shift resets."""

import math

import pytest
import torch
import torch.nn.functional as F

from attnlab.attention import AttentionSpec, kernels, transforms
from attnlab.attention.registry import Transform
from attnlab.errors import UserError
from attnlab.models.vit import ViT, ViTConfig, sincos_2d


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(image_size=8, patch_size=2, channels=3, num_classes=5, n_layer=2, n_head=2, d_model=16)
    return ViT(ViTConfig(**(base | kw))).eval()


def _images(b=3, c=3, h=8, w=8, seed=1):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("pos", ["learned", "sincos", "none"])
def test_shapes_loss_and_gradients(pool, pos):
    model = _model(pool=pool, pos=pos).train()
    x, y = _images(), torch.tensor([0, 4, 2])
    logits = model(x)
    assert logits.shape == (3, 5)
    logits2, loss = model(x, y)
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.cfg.seq_len == 16 + (pool == "cls")


def test_rectangular_images():
    model = _model(image_size=4, image_width=8, pos="sincos")
    assert model.cfg.grid_shape == (2, 4)
    assert model(_images(h=4, w=8)).shape == (3, 5)
    with pytest.raises(UserError, match=r"\[B, 3, 4, 8\]"):
        model(_images(h=8, w=4))


@pytest.mark.parametrize("kw, match", [
    (dict(image_size=10, patch_size=4), "not divisible by patch_size"),
    (dict(image_width=6, patch_size=4), "not divisible by patch_size"),
    (dict(d_model=18, n_head=4), "not divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "multiple of n_kv_head"),
    (dict(pos="sincos", d_model=18, n_head=2), "multiple of 4"),
    (dict(patch_size=0), "patch_size"),
    (dict(n_layer=0), "n_layer"),
    (dict(channels=0), "channels"),
    (dict(num_classes=1), "num_classes"),
    (dict(dropout=1.0), "dropout"),
    (dict(d_ff=0), "d_ff"),
    (dict(pool="max"), "pool"),
    (dict(patch_kernel=1), "patch_kernel"),
    (dict(patch_kernel=9), "patch_kernel"),
    (dict(patch_size=1, patch_kernel=2), "odd"),
])
def test_bad_configs_are_one_line_user_errors(kw, match):
    base = dict(image_size=8, patch_size=2, d_model=16, n_head=2)
    with pytest.raises(UserError, match=match) as e:
        ViTConfig(**(base | kw))
    assert "\n" not in str(e.value)


def test_inputs_of_the_wrong_kind_are_refused():
    model = _model()
    with pytest.raises(UserError, match="shape"):
        model(_images(c=1))
    with pytest.raises(UserError, match="float"):
        model(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def _noncausal_kernels():
    names = [n for n, e in kernels().items() if e.caps.noncausal]
    assert "exact" in names and len(names) >= 2  # the registry lists more than the fallback
    return names


@pytest.mark.parametrize("name", _noncausal_kernels())
@pytest.mark.parametrize("transform", ["none", *transforms()])
def test_every_registered_mechanism_builds_and_trains(name, transform):
    spec = AttentionSpec(name=name, layers="last:1", transform=transform)
    model = _model(attention=spec).train()
    kinds = [type(b.attn.kernel).__name__ for b in model.blocks]
    assert kinds[0] == type(_model().blocks[0].attn.kernel).__name__  # layer 0 stays exact
    assert all((b.attn.transform is not None) == (transform != "none") for b in model.blocks)
    _, loss = model(_images(), torch.tensor([1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _permute_patches(x, perm, p):
    """Move the P×P patch at row-major grid index perm[i] to grid index i (a slow, explicit reference)."""
    b, c, h, w = x.shape
    gw = w // p
    out = torch.empty_like(x)
    for i, j in enumerate(perm.tolist()):
        ri, ci, rj, cj = i // gw, i % gw, j // gw, j % gw
        out[:, :, ri * p:(ri + 1) * p, ci * p:(ci + 1) * p] = x[:, :, rj * p:(rj + 1) * p, cj * p:(cj + 1) * p]
    return out


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_without_positions_the_prediction_ignores_where_patches_are(pool):
    # Attention and the MLP act on the set of patch tokens; with no position signal and a symmetric readout,
    # shuffling the image's patches leaves the logits exactly as they were (up to rounding, in float64).
    model = _model(pos="none", pool=pool).double()
    x = _images().double()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(perm, torch.arange(16))
    shuffled = _permute_patches(x, perm, 2)
    torch.testing.assert_close(model(shuffled), model(x), rtol=1e-12, atol=1e-12)
    for pos in ("learned", "sincos"):
        placed = _model(pos=pos, pool=pool).double()
        assert (placed(shuffled) - placed(x)).abs().max() > 1e-6
    # KV shifting mixes each key with its row-major predecessor, so patch order matters to it as well.
    shifted = _model(pos="none", pool=pool, attention=AttentionSpec(transform="kv_shift")).double()
    assert (shifted(shuffled) - shifted(x)).abs().max() > 1e-6


def test_sincos_positions_match_the_formula():
    grid_h, grid_w, d = 3, 5, 8
    table = sincos_2d(grid_h, grid_w, d)
    assert table.shape == (15, 8)
    for r in range(grid_h):
        for c in range(grid_w):
            want = []
            for coord in (r, c):
                freqs = [1 / 10000 ** (i / (d // 4)) for i in range(d // 4)]
                want += [math.sin(coord * f) for f in freqs] + [math.cos(coord * f) for f in freqs]
            torch.testing.assert_close(table[r * grid_w + c], torch.tensor(want), atol=1e-6, rtol=1e-6)


def test_kv_shift_never_mixes_the_first_patch_with_the_class_token():
    model = _model(pool="cls", attention=AttentionSpec(transform="kv_shift")).double()
    seen = []
    tf = model.blocks[0].attn.transform
    assert isinstance(tf, Transform)
    tf.register_forward_hook(lambda mod, args, out: seen.append((args[0], out[0])))
    model(_images().double())
    k_in, k_out = seen[0]  # [B, H, N, D], token 0 is the class token
    a = tf.coefficients()["alpha"].double()[None, :, None]  # [1, H, 1]
    torch.testing.assert_close(k_out[:, :, 0], a[..., 0] * k_in[:, :, 0])  # nothing before the class token
    torch.testing.assert_close(k_out[:, :, 1], a[..., 0] * k_in[:, :, 1])  # first patch: reset, no cls mix
    torch.testing.assert_close(k_out[:, :, 2], a[..., 0] * k_in[:, :, 2] + a[..., 1] * k_in[:, :, 1])


@pytest.mark.parametrize("patch, kernel", [(2, 2), (2, 3), (2, 5), (2, 6), (4, 7), (4, 8), (1, 3)])
def test_overlapping_patch_embedding_is_a_linear_map_of_the_window_around_each_patch(patch, kernel):
    # Reference in float64 by explicit slicing: token (i, j) = W · (the kernel×kernel window whose top-left
    # corner is ceil((kernel − patch)/2) pixels above and left of patch (i, j), zeros outside the image) + b.
    model = _model(patch_size=patch, patch_kernel=kernel, pos="none").double()
    x = _images().double()
    q = (kernel - patch + 1) // 2
    padded = F.pad(x, (q, q + kernel, q, q + kernel))
    w, b = model.patch_embed.weight, model.patch_embed.bias
    rows, cols = model.cfg.grid_shape
    want = torch.stack([
        torch.einsum("bchw,dchw->bd", padded[:, :, i * patch:i * patch + kernel, j * patch:j * patch + kernel], w) + b
        for i in range(rows) for j in range(cols)], dim=1)
    got = model.patch_embed(x).flatten(2).transpose(1, 2)
    assert model.cfg.num_patches == rows * cols == (8 // patch) ** 2
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_overlapping_patches_see_their_neighbours_and_plain_ones_do_not():
    x = _images(b=1)
    bumped = x.clone()
    bumped[0, :, 2, 1] += 5.0  # the pixel just left of patch (1, 1) of a 2×2-patch grid
    for kernel, moved in ((2, False), (4, True)):
        embed = _model(patch_kernel=kernel).patch_embed
        tok = lambda im: embed(im)[0, :, 1, 1]  # noqa: E731
        assert (not torch.allclose(tok(x), tok(bumped))) == moved


def test_parameter_count_by_hand():
    c, p, d, n_cls, layers, ff = 3, 2, 16, 5, 2, 64
    patches = 16
    per_layer = 4 * (d * d + d) + 2 * 2 * d + (d * ff + ff) + (ff * d + d)
    want = (c * p * p * d + d) + d + patches * d + layers * per_layer + 2 * d + (d * n_cls + n_cls)
    model = _model()
    assert model.num_params() == want == sum(q.numel() for q in model.parameters())
    assert _model(pos="sincos", pool="mean").num_params() == want - patches * d - d


def test_dropout_only_in_training():
    model = _model(dropout=0.3)
    x = _images()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_config_round_trips_through_a_plain_dict():
    # What the trainer stores in a checkpoint is what `attnlab eval` rebuilds the model from.
    from dataclasses import asdict

    from attnlab.config import from_dict

    cfg = ViTConfig(image_size=8, patch_size=2, d_model=16, n_head=2, pool="mean", pos="sincos",
                    attention=AttentionSpec(name="ssa", options={"factor": 2}, transform="kv_shift"))
    assert from_dict(ViTConfig, asdict(cfg)) == cfg
    with pytest.raises(UserError, match="pool"):
        from_dict(ViTConfig, {"pool": "max"})
