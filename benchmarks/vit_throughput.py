"""One ViT training step of attnlab against lucidrains' x-transformers `ViTransformerWrapper` at the same shape.

Both models run in this process and their steps alternate A B B A … (`attnlab.bench.measure.interleaved`), so
drifts of the machine's speed hit both alike; the figure is the ratio of median images/s. On CPU the clock is
the process's CPU time. Needs `pip install x-transformers` (the `bench` extra).

Same shape: pre-LayerNorm blocks without biases, GELU MLP ×4, exact attention through SDPA (`attn_flash=True`
there), learned positions, no dropout, AdamW. attnlab puts a class token in front of the patches and reads
it out; x-transformers gets one register token, so both attend over patches + 1 tokens (it mean-pools the
patches instead). x-transformers' patch embedding adds two LayerNorms and a bias (2·d + P²·C parameters more).

    OMP_NUM_THREADS=1 python benchmarks/vit_throughput.py                  # 28×28, patch 2: 196 patches + 1
    python benchmarks/vit_throughput.py --device cuda --batch 256 --d_model 384 --heads 6 --layers 6
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from attnlab.bench.measure import CLOCKS, interleaved
from attnlab.models.vit import ViT, ViTConfig
from attnlab.training.device import autocast, resolve_device


def build_attnlab(a):
    return ViT(ViTConfig(image_size=a.image_size, patch_size=a.patch, channels=a.channels, num_classes=a.classes,
                         n_layer=a.layers, n_head=a.heads, d_model=a.d_model, pool="cls", pos="learned",
                         norm="layernorm", mlp="gelu", bias=False, dropout=0.0))


def build_xt(a):
    from x_transformers import Encoder, ViTransformerWrapper

    return ViTransformerWrapper(
        image_size=a.image_size, patch_size=a.patch, channels=a.channels, num_classes=a.classes,
        num_register_tokens=1,
        attn_layers=Encoder(dim=a.d_model, depth=a.layers, heads=a.heads, attn_dim_head=a.d_model // a.heads,
                            attn_flash=True, ff_mult=4, ff_no_bias=True, attn_dropout=0.0, ff_dropout=0.0))


def make_step(model, loss_fn, x, y, device, amp):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with autocast(device, amp):
            loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image_size", type=int, default=28)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--clock", choices=CLOCKS, default="auto", help="auto: wall clock on CUDA, process CPU time on CPU")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    device, amp = resolve_device(a.device, a.dtype)
    torch.manual_seed(0)
    x = torch.randn(a.batch, a.channels, a.image_size, a.image_size, device=device)
    y = torch.randint(0, a.classes, (a.batch,), device=device)
    models = {"attnlab": (build_attnlab(a), lambda m, x, y: m(x, y)[1]),
              "x-transformers": (build_xt(a), lambda m, x, y: F.cross_entropy(m(x).float(), y))}
    steps = {k: make_step(m.to(device).train(), fn, x, y, device, amp) for k, (m, fn) in models.items()}
    params = {k: sum(q.numel() for q in m.parameters()) for k, (m, _) in models.items()}
    times = interleaved(steps, a.rounds, device, clock_kind=a.clock, warmup=a.warmup, alternate=True)
    res = {k: {"params": params[k], "median_step_ms": 1e3 * statistics.median(v),
               "images_per_s": a.batch / statistics.median(v)} for k, v in times.items()}
    ratio = res["attnlab"]["images_per_s"] / res["x-transformers"]["images_per_s"]
    # Each round times both back to back: the median of per-round ratios shrugs off bursts of load.
    paired = statistics.median(x / v for x, v in zip(times["x-transformers"], times["attnlab"]))
    tokens = (a.image_size // a.patch) ** 2 + 1
    out = {"config": vars(a), "device": str(device), "autocast": str(amp), "threads": torch.get_num_threads(),
           "tokens_per_image": tokens, "results": res, "ratio_attnlab_over_xt": ratio,
           "paired_ratio_attnlab_over_xt": paired}
    print(json.dumps(out, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
