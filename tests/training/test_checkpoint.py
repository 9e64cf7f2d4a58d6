"""Checkpoint integrity: damaged files give one line naming the file, never NaN weights or a traceback."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from attnlab.errors import UserError
from attnlab.models.lm import LM, LMConfig
from attnlab.training import TrainConfig, train
from attnlab.training.average import average_checkpoints
from attnlab.training.checkpoint import load_train_state, load_weights, resolve_checkpoint, tensors_sha256
from attnlab.tasks import SyntheticConfig, SyntheticTask

TINY = dict(vocab_size=32, n_layer=1, n_head=2, d_model=32, max_seq_len=32)


def _run(tmp_path, steps=2, **kw):
    task = SyntheticTask(SyntheticConfig(vocab_size=32, seq_len=32, eval_batches=1), batch_size=2, seed=0)
    cfg = TrainConfig(steps=steps, batch_size=2, eval_every=0, log_every=1, device="cpu", progress=False,
                      tensorboard=False, **kw)
    torch.manual_seed(0)
    train(LM(LMConfig(**TINY)), task, cfg, out_dir=tmp_path)
    return resolve_checkpoint(tmp_path)


def _data_start(path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _message(e, tmp_path) -> str:
    return str(e.value).replace(str(tmp_path), "TMP")  # pytest names tmp_path after the test


def test_overwritten_tensor_bytes_are_detected(tmp_path):
    ck = _run(tmp_path)
    weights = ck / "model.safetensors"
    start, size = _data_start(weights), weights.stat().st_size
    assert size - start > 8000
    _overwrite(weights, (start + size) // 2 - 2000, b"\xff" * 4000)  # NaN bit patterns in float32
    with pytest.raises(UserError) as e:
        load_weights(LM(LMConfig(**TINY)), ck)
    assert "damaged" in _message(e, tmp_path) and "does not match the model" not in str(e.value)
    assert str(weights) in str(e.value)


def test_a_single_flipped_bit_is_detected(tmp_path):
    ck = _run(tmp_path)
    weights = ck / "model.safetensors"
    off = _data_start(weights) + 100
    byte = weights.read_bytes()[off]
    _overwrite(weights, off, bytes([byte ^ 0x01]))
    with pytest.raises(UserError, match="damaged"):
        load_weights(LM(LMConfig(**TINY)), ck)


def test_unreadable_header_says_damaged(tmp_path):
    ck = _run(tmp_path)
    _overwrite(ck / "model.safetensors", 12, b"#" * 40)
    with pytest.raises(UserError) as e:
        load_weights(LM(LMConfig(**TINY)), ck)
    msg = _message(e, tmp_path)
    assert "damaged" in msg and "cannot read" in msg and "does not match" not in msg and "\n" not in msg


def test_header_damage_that_still_parses_says_damaged_not_mismatch(tmp_path):
    # A changed byte inside a tensor name leaves valid JSON: the names no longer match the model's, but the
    # cause is the file, not the model, and the message must say so.
    ck = _run(tmp_path)
    path = ck / "model.safetensors"
    data = path.read_bytes()
    at = data.index(b"blocks.0", 0, _data_start(path))
    _overwrite(path, at, b"blocks.7")
    with pytest.raises(UserError) as e:
        load_weights(LM(LMConfig(**TINY)), ck)
    msg = _message(e, tmp_path)
    assert "damaged" in msg and "does not match the model" not in msg


def test_weights_without_a_checksum_still_load(tmp_path):
    # Files written before checksums existed (or by other tools) load unchecked.
    model = LM(LMConfig(**TINY))
    state = {k: v for k, v in model.state_dict().items() if k != "head.weight"}  # tied to embed.weight
    (tmp_path / "ck").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "ck" / "model.safetensors"))
    other = LM(LMConfig(**TINY))
    load_weights(other, tmp_path / "ck")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_checksum_is_of_the_tensors_not_the_layout():
    a = {"x": torch.arange(6.0).reshape(2, 3), "y": torch.zeros(2, dtype=torch.int64)}
    b = {"y": a["y"].clone(), "x": a["x"].clone()}
    assert tensors_sha256(a) == tensors_sha256(b)
    assert tensors_sha256(a) != tensors_sha256({**a, "x": a["x"].reshape(3, 2)})  # shape counts
    assert tensors_sha256(a) != tensors_sha256({**a, "x": a["x"].to(torch.float64)})  # dtype counts


def test_averaged_checkpoint_carries_its_own_checksum(tmp_path):
    _run(tmp_path / "run", steps=4, save_every=2, keep_checkpoints=0)
    from attnlab.training.checkpoint import list_checkpoints

    out = average_checkpoints(list_checkpoints(tmp_path / "run"), tmp_path / "avg")
    load_weights(LM(LMConfig(**TINY)), out.parent)  # verifies the new checksum
    _overwrite(out, _data_start(out) + 64, b"\x00" * 8)
    with pytest.raises(UserError, match="damaged"):
        average_checkpoints([out.parent, out.parent], tmp_path / "avg2")


@pytest.mark.parametrize("keep_checksum", [True, False])
def test_truncated_train_state_refuses_to_resume(tmp_path, keep_checksum):
    ck = _run(tmp_path)
    state = ck / "train_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    if not keep_checksum:  # as an older checkpoint: the load itself must fail cleanly
        cfg = json.loads((ck / "config.json").read_text())
        cfg.pop("checksums")
        (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="damaged") as e:
        load_train_state(ck)
    assert str(state) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="damaged"):
        _run(tmp_path, steps=4, resume=True)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_train_state_cannot_run_code(tmp_path, capsys):
    ck = _run(tmp_path)
    torch.save({"step": 2, "x": _Payload()}, ck / "train_state.pt")
    cfg = json.loads((ck / "config.json").read_text())
    cfg.pop("checksums")
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="cannot read"):
        load_train_state(ck)
    assert "code ran" not in capsys.readouterr().out
