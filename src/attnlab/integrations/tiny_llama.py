"""Build a small Llama-shaped checkpoint locally, for `attnlab hf-eval` without downloading anything.

A transformers LlamaForCausalLM (rotary, RMSNorm, SwiGLU, grouped-query attention) over UTF-8 bytes, briefly
trained on a text file so that its perplexity means something, saved with a byte-level tokenizer:

    python -m attnlab.integrations.tiny_llama --data /path/to/tinyshakespeare.txt --out runs/tiny-llama
    attnlab hf-eval --model runs/tiny-llama --data runs/tiny-llama/heldout.txt --attention hyper ...

It trains on the first 90% of the file and writes the last 10% to OUT/heldout.txt for evaluation.
`write_gguf` writes such a model as a GGUF file (llama.cpp's layout), to exercise GGUF loading offline.
`--minutes` caps the training time (the defaults take about 10 minutes on one CPU core); `--steps 0`
saves the random initialisation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from ..errors import UserError


def make_tiny_llama(data: str | Path, out: str | Path, *, layers: int = 4, hidden: int = 128, heads: int = 4,
                    kv_heads: int = 2, context: int = 1024, batch: int = 4, steps: int = 300, minutes: float = 10.0,
                    lr: float = 2e-3, seed: int = 0, log=print) -> dict:
    """Train (for at most `steps` steps and `minutes`) and save the checkpoint, its tokenizer and the held-out
    text into `out`; returns what it writes to OUT/training.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .hf_eval import byte_level_tokenizer

    args = dict(data=str(data), out=str(out), layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                context=context, batch=batch, steps=steps, minutes=minutes, lr=lr, seed=seed)
    torch.manual_seed(seed)
    raw = Path(data).read_bytes()
    cut = int(len(raw) * 0.9)
    train = torch.frombuffer(bytearray(raw[:cut]), dtype=torch.uint8).long()
    if steps and len(train) <= context + 1:
        raise UserError(f"{data} is too short for context {context}")

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max(8192, context),
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)

    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    t0, losses, step = time.time(), [], 0
    for step in range(steps):
        if time.time() - t0 > minutes * 60:
            log(f"time cap reached after {step} steps")
            break
        starts = torch.randint(0, len(train) - context - 1, (batch,))
        x = torch.stack([train[s : s + context] for s in starts])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            log(f"step {step:4d}  loss {loss.item():.3f} nats/byte  {time.time() - t0:.0f}s")
    else:
        step = steps

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    byte_level_tokenizer().save_pretrained(out)
    (out / "heldout.txt").write_bytes(raw[cut:])
    info = {"args": args, "steps_done": step, "seconds": time.time() - t0,
            "final_train_loss_mean_last10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "params": sum(p.numel() for p in model.parameters())}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def write_gguf(model, path: str | Path, *, merges: tuple[str, ...] = ("t h", "th e")) -> Path:
    """Write a byte-level Llama (as `make_tiny_llama` builds) into a float32 GGUF file, the layout llama.cpp's
    converter writes: tensors under GGUF names, q/k rows permuted to llama.cpp's rotary order, a byte-level
    BPE vocabulary (the 256 bytes, then one token per merge) in the metadata. For tests and demos of GGUF
    loading; transformers reads it back with `from_pretrained(dir, gguf_file=name)`."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    spelled = bytes_to_unicode()
    tokens = [spelled[b] for b in range(256)] + ["".join(m.split(" ")) for m in merges]
    if cfg.vocab_size != len(tokens):
        raise UserError(f"write_gguf: the model has {cfg.vocab_size} tokens, the byte vocabulary {len(tokens)}")

    def permute(w, heads):  # HF's rotate-half rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf.py)
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    path = Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("attnlab tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(cfg.hidden_size // n_head)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(list(merges))  # merges of printable ASCII are spelled as they are
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for key, value in sd.items():
        if key == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            w.add_tensor("output.weight", value)
            continue
        rest = key.removeprefix("model.")
        if rest in names:
            w.add_tensor(names[rest], value)
            continue
        _, layer, sub = rest.split(".", 2)
        part = sub.removesuffix(".weight")
        if part == "self_attn.q_proj":
            value = permute(value, n_head)
        elif part == "self_attn.k_proj":
            value = permute(value, n_kv)
        w.add_tensor(f"blk.{layer}.{per_layer[part]}.weight", np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attnlab.integrations.tiny_llama", description=__doc__.splitlines()[0])
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
    a = vars(ap.parse_args(argv))
    try:
        info = make_tiny_llama(a.pop("data"), a.pop("out"), **a, log=lambda m: print(m, flush=True))
    except (UserError, FileNotFoundError) as e:
        print(f"tiny_llama: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
