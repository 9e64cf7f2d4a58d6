"""Build a small Llama-shaped checkpoint locally, for `attnlab hf-eval` without downloading anything.

A transformers LlamaForCausalLM (rotary, RMSNorm, SwiGLU, grouped-query attention) over UTF-8 bytes, briefly
trained on a text file so that its perplexity means something, saved with a byte-level tokenizer:

    python benchmarks/make_tiny_llama.py --data /path/to/tinyshakespeare.txt --out runs/tiny-llama
    attnlab hf-eval --model runs/tiny-llama --data runs/tiny-llama/heldout.txt --attention hyper ...

It trains on the first 90% of the file and writes the last 10% to OUT/heldout.txt for evaluation.
`--minutes` caps the training time (the defaults take about 10 minutes on one CPU core); `--steps 0`
saves the random initialisation.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="UTF-8 text to train on (e.g. tinyshakespeare.txt)")
    ap.add_argument("--out", required=True, help="directory to save the checkpoint and tokenizer into")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--context", type=int, default=1024, help="training window in bytes")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--minutes", type=float, default=10.0, help="stop training after this long")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM

    from attnlab.integrations.hf_eval import byte_level_tokenizer

    torch.manual_seed(args.seed)
    raw = Path(args.data).read_bytes()
    cut = int(len(raw) * 0.9)
    train = torch.frombuffer(bytearray(raw[:cut]), dtype=torch.uint8).long()
    if len(train) <= args.context + 1:
        raise SystemExit(f"{args.data} is too short for --context {args.context}")

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 32 * 32,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(8192, args.context),
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)

    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    t0, log, step = time.time(), [], 0
    for step in range(args.steps):
        if time.time() - t0 > args.minutes * 60:
            print(f"time cap reached after {step} steps")
            break
        starts = torch.randint(0, len(train) - args.context - 1, (args.batch,))
        x = torch.stack([train[s : s + args.context] for s in starts])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append(loss.item())
        if step % 20 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f} nats/byte  {time.time() - t0:.0f}s", flush=True)
    else:
        step = args.steps

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    byte_level_tokenizer().save_pretrained(out)
    (out / "heldout.txt").write_bytes(raw[cut:])
    info = {"args": vars(args), "steps_done": step, "seconds": time.time() - t0,
            "final_train_loss_mean_last10": sum(log[-10:]) / max(1, len(log[-10:])) if log else None,
            "params": sum(p.numel() for p in model.parameters())}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
