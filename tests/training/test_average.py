import pytest
import torch
from safetensors.torch import load_file, save_file

from attnlab.errors import UserError
from attnlab.training.average import average_checkpoints


def write(path, tensors):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def test_average_is_the_elementwise_mean(tmp_path):
    torch.manual_seed(0)
    ws = [torch.randn(3, 4) for _ in range(3)]
    hs = [torch.randn(5).to(torch.bfloat16) for _ in range(3)]
    files = [write(tmp_path / f"c{i}" / "model.safetensors", {"w": w, "h": h, "n": torch.tensor([7])})
             for i, (w, h) in enumerate(zip(ws, hs))]
    out = average_checkpoints([files[0], files[1].parent, files[2]], tmp_path / "avg.safetensors")
    got = load_file(str(out))
    torch.testing.assert_close(got["w"], sum(ws) / 3)
    assert got["h"].dtype == torch.bfloat16
    torch.testing.assert_close(got["h"], (sum(h.double() for h in hs) / 3).to(torch.bfloat16))
    assert got["n"].tolist() == [7]


def test_folder_output_loads_as_a_checkpoint(tmp_path):
    from attnlab.training.checkpoint import load_weights, resolve_checkpoint

    model = torch.nn.Linear(3, 2)
    a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    b = {k: v + 1.0 for k, v in a.items()}
    fa, fb = write(tmp_path / "a" / "model.safetensors", a), write(tmp_path / "b" / "model.safetensors", b)
    (tmp_path / "b" / "config.json").write_text("{}")
    out = average_checkpoints([fa, fb], tmp_path / "avg")
    assert (tmp_path / "avg" / "config.json").is_file()
    load_weights(model, resolve_checkpoint(out.parent))
    torch.testing.assert_close(model.weight.detach(), a["weight"] + 0.5)


def test_mismatched_checkpoints_are_refused(tmp_path):
    a = write(tmp_path / "a.safetensors", {"w": torch.zeros(2)})
    b = write(tmp_path / "b.safetensors", {"v": torch.zeros(2)})
    c = write(tmp_path / "c.safetensors", {"w": torch.zeros(3)})
    d = write(tmp_path / "d.safetensors", {"w": torch.tensor([1, 2])})
    e = write(tmp_path / "e.safetensors", {"w": torch.tensor([1, 3])})
    with pytest.raises(UserError, match="other tensors"):
        average_checkpoints([a, b], tmp_path / "o.safetensors")
    with pytest.raises(UserError, match="shape"):
        average_checkpoints([a, c], tmp_path / "o.safetensors")
    with pytest.raises(UserError, match="integer tensor"):
        average_checkpoints([d, e], tmp_path / "o.safetensors")
    with pytest.raises(UserError, match="not found"):
        average_checkpoints([tmp_path / "missing"], tmp_path / "o.safetensors")


def test_cli_averages_the_last_checkpoints_of_a_run(tmp_path, capsys):
    from attnlab.cli import main

    for step, value in [(10, 0.0), (20, 1.0), (30, 2.0), (40, 4.0)]:
        write(tmp_path / "run" / "checkpoints" / f"step_{step:06d}" / "model.safetensors", {"w": torch.full((2,), value)})
    assert main(["average-checkpoints", "--run", str(tmp_path / "run"), "--last", "2", "--out", str(tmp_path / "avg")]) == 0
    assert load_file(str(tmp_path / "avg" / "model.safetensors"))["w"].tolist() == [3.0, 3.0]
    assert main(["average-checkpoints", "--out", str(tmp_path / "x")]) == 2
    assert "either --inputs" in capsys.readouterr().err
