"""One training step of the attnlab LM against lucidrains' x-transformers at an identical configuration.

Both models run in this process, alternating step by step, so machine noise hits them alike; the result
is the ratio of their median tokens/s. Needs `pip install x-transformers` (the `bench` extra).

    python benchmarks/train_throughput.py --layers 4 --d_model 128 --heads 4 --context 64 --batch 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build_attnlab(a):
    from attnlab.models.lm import LM, LMConfig

    return LM(LMConfig(vocab_size=a.vocab, n_layer=a.layers, n_head=a.heads, d_model=a.d_model, max_seq_len=a.context,
                       pos="rope", norm="layernorm", mlp="gelu", bias=False, dropout=0.0, tie_embeddings=True))


def build_xt(a):
    from x_transformers import Decoder, TransformerWrapper

    return TransformerWrapper(
        num_tokens=a.vocab, max_seq_len=a.context, use_abs_pos_emb=False, tie_embedding=True,
        attn_layers=Decoder(dim=a.d_model, depth=a.layers, heads=a.heads, attn_dim_head=a.d_model // a.heads,
                            rotary_pos_emb=True, rotary_emb_dim=a.d_model // a.heads, attn_flash=True, ff_mult=4, ff_no_bias=True, attn_dropout=0.0,
                            ff_dropout=0.0))


def attnlab_loss(model, x, y):
    return model(x, y)[1]


def xt_loss(model, x, y):
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = dict(layers=4, d_model=128, heads=4, context=64, batch=12, vocab=65, steps=60, warmup=5)
    for name, default in defaults.items():
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--json", default="")
    a = p.parse_args()
    torch.manual_seed(0)
    models = {"attnlab": (build_attnlab(a), attnlab_loss), "x-transformers": (build_xt(a), xt_loss)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in models.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, (m, _) in models.items()}
    times = {k: [] for k in models}
    for i in range(a.warmup + a.steps):
        x, y = (torch.randint(0, a.vocab, (a.batch, a.context)) for _ in range(2))
        for k in list(models) if i % 2 == 0 else list(reversed(models)):
            model, loss_fn = models[k]
            t0 = time.perf_counter()
            loss_fn(model, x, y).backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            times[k].append(time.perf_counter() - t0)
    median = {k: statistics.median(v[a.warmup:]) for k, v in times.items()}  # the warm-up steps left out
    res = {k: {"params": params[k], "median_step_ms": 1000 * m, "tokens_per_s": a.batch * a.context / m}
           for k, m in median.items()}
    ratio = res["attnlab"]["tokens_per_s"] / res["x-transformers"]["tokens_per_s"]
    out = {"config": vars(a), "threads": torch.get_num_threads(), "results": res, "ratio_attnlab_over_xt": ratio}
    print(json.dumps(out, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
