"""`attnlab bench quantize --model DIR | --gguf_file FILE --data TEXT`: the int8 path on a pretrained
transformers causal LM (any architecture whose layers are nn.Linear / nn.Embedding), against its fp32 self.

Variants: fp32 (a GGUF file's weights dequantised to float32), dynamic int8 through fbgemm and through
torch._int_mm, and weight-only int8, all copies of one loaded model. Per variant:
  size       bytes of the weights saved as safetensors (fp32: its state, tied tensors once; int8: quantized_state).
  perplexity e-based, over --windows held-out windows of --context tokens (the last 10% of --data, cut as
             `attnlab finetune` cuts it); this pass is also the untimed warm-up of the eval timing.
  eval tok/s a forward over the same windows, one at a time; --rounds interleaved rounds, median.
  gen tok/s  greedy `model.generate` at batch 1: --gen_tokens new tokens (end-of-sequence suppressed) after the
             first PROMPT held-out tokens; one untimed warm-up, then --rounds interleaved rounds, median.
  gen_agree  how many of those new tokens match fp32's before the first difference.
Times are this process's CPU time (the clock of `bench.measure`), so other load on the machine weighs little.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from ..errors import UserError
from ..training.checkpoint import _state_for_safetensors
from .measure import interleaved
from .quantize import int8_variants, weight_bytes

PROMPT = 8
VAL_FRACTION = 0.1  # attnlab finetune's default held-out share


def check_source(cfg) -> None:
    """Refuse, when the options are parsed, a bad pretrained-model source or data file (one line each)."""
    from ..errors import require_file
    from ..integrations.hf_load import resolve_source

    if cfg.ckpt:
        raise UserError("--ckpt (an attnlab run) and --model/--gguf_file (a pretrained model) exclude each other")
    if not cfg.data:
        raise UserError("--model/--gguf_file need --data: a text file whose held-out end gives the perplexity")
    resolve_source(cfg.model or None, cfg.gguf_file or None)
    if not Path(require_file(cfg.data, "data file")).is_file():
        raise UserError(f"--data must be a text file: {cfg.data}")


def pretrained_bench(cfg, ctx) -> dict:
    from ..integrations.hf_finetune import heldout_nll, heldout_windows, token_split
    from ..integrations.hf_load import load_pretrained, resolve_source

    where, gguf = resolve_source(cfg.model or None, cfg.gguf_file or None)
    source = where / gguf if gguf else where
    tok, fp32 = load_pretrained(where, gguf, device="cpu")
    limit = getattr(fp32.config, "max_position_embeddings", None)
    if limit and cfg.context > limit:
        raise UserError(f"--context {cfg.context} is longer than the model's {limit} positions")
    _, held = token_split(tok, Path(cfg.data), VAL_FRACTION, cfg.context)
    windows = heldout_windows(held, cfg.context, cfg.windows)
    prompt = windows[:1, :min(PROMPT, cfg.context)]
    models, kept = int8_variants(fp32)
    print(f"{source}: {type(fp32).__name__}, {sum(p.numel() for p in fp32.parameters()):,} parameters; CPU, "
          f"{torch.get_num_threads()} thread(s); {len(windows)}×{cfg.context} held-out tokens; variants: "
          f"{', '.join(models)}", flush=True)

    rows = {}
    for name, m in models.items():  # the perplexity pass doubles as the eval timing's warm-up
        rows[name] = {"variant": name, "ppl": heldout_nll(m, windows, batch_size=1, seed=cfg.seed)["perplexity"]}
        print(f"  {name:>16}: perplexity {rows[name]['ppl']:.3f}", flush=True)
    gen_cfg = _greedy(fp32, tok, cfg.gen_tokens)
    outs = {}

    def fwd(m):
        def run():
            for w in windows:
                m(input_ids=w[None], use_cache=False)
        return run

    def gen(name, m):
        def run():
            outs[name] = m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=gen_cfg)
        return run

    cpu = torch.device("cpu")
    with torch.inference_mode():
        t_eval = interleaved({k: fwd(m) for k, m in models.items()}, cfg.rounds, cpu, warmup=0, alternate=True)
        print("  eval timed", flush=True)
        t_gen = interleaved({k: gen(k, m) for k, m in models.items()}, cfg.rounds, cpu, warmup=1, alternate=True)
    ref_new = outs["fp32"][0, prompt.shape[1]:]
    for name, m in models.items():
        new = outs[name][0, prompt.shape[1]:]
        rows[name].update({"params": sum(t.numel() for t in _state_for_safetensors(m).values()),
                           "bytes": weight_bytes(name, m, ctx.out),
                           "eval_tok_s": windows.numel() / statistics.median(t_eval[name]),
                           "gen_tok_s": len(new) / statistics.median(t_gen[name]),
                           "gen_agree": int((new == ref_new).long().cumprod(0).sum())})
    base = rows["fp32"]
    for name, r in rows.items():
        r["size_ratio"] = r["bytes"] / base["bytes"]
        r["eval_speedup"] = r["eval_tok_s"] / base["eval_tok_s"]
        r["gen_speedup"] = r["gen_tok_s"] / base["gen_tok_s"]
        r["ppl_change"] = r["ppl"] / base["ppl"] - 1
        print(f"  {name:>16}: {r['bytes'] / 2**20:.1f} MiB (×{r['size_ratio']:.3f}), eval {r['eval_tok_s']:.1f} tok/s "
              f"(×{r['eval_speedup']:.2f}), generate {r['gen_tok_s']:.2f} tok/s (×{r['gen_speedup']:.2f}), "
              f"perplexity {r['ppl']:.3f} ({r['ppl_change']:+.2%}), greedy agrees for {r['gen_agree']}/"
              f"{len(ref_new)}", flush=True)
    rows = list(rows.values())
    notes = [("dynamic-fbgemm quantises each call's activations with one scale, dynamic-int_mm each token's with "
              "its own; weight-only dequantises the weights on every call."),
             f"{len(kept)} Linear/Embedding module(s) kept in float: {kept}." if kept else
             "Every Linear and Embedding is int8."]
    if gguf:
        notes.append(f"The GGUF file itself is {source.stat().st_size / 2**20:.1f} MiB; its weights are "
                     "dequantised to float32 before int8 quantisation.")
    ctx.report.csv("quantize.csv", rows)
    rep = ctx.report
    rep.h("int8 against fp32 on a pretrained model, CPU", 1)
    rep.p(f"{source} ({type(fp32).__name__}) on the last {VAL_FRACTION:.0%} of {cfg.data}: perplexity and eval over "
          f"{len(windows)} window(s) of {cfg.context} tokens; generate {cfg.gen_tokens} tokens greedy at batch 1 after "
          f"{prompt.shape[1]} prompt tokens; {torch.get_num_threads()} thread(s); medians of {cfg.rounds} interleaved "
          f"rounds (process CPU time). Ratios are against fp32; gen_agree counts new tokens equal to fp32's before "
          "the first difference. " + " ".join(notes))
    rep.table(rows, ["variant", "bytes", "size_ratio", "eval_tok_s", "eval_speedup", "gen_tok_s", "gen_speedup",
                     "ppl", "ppl_change", "gen_agree"], fmt="{:.4g}")
    rep.save()
    return {"rows": rows, "notes": notes}


def _greedy(model, tok, n: int):
    """Exactly n greedy tokens, whatever sampling defaults the checkpoint ships with."""
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    pad = next((t for t in (tok.pad_token_id, eos if isinstance(eos, int) else None) if t is not None), 0)
    return GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=pad)
