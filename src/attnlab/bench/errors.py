"""The error study of `attnlab bench attention`: ‖o − o_exact‖ / ‖o_exact‖ at equal sizes.

Every mechanism runs with its `small_options` (or the study's `error_options`) so that it approximates at
modest n, beside the variants it offers for the study, on Gaussian q/k/v and on q/k/v captured from a trained
attnlab LM (`checkpoint`), averaged over seeds. A design variant that draws what its mechanism draws
(`Kernel.paired_designs`) is compared with it on the query rows where the two differ.

Exact attention is invariant to a common offset u added to every key (row i's logits all shift by
q_i·u·scale); attended zero keys do not shift with them. So the study also sweeps such an offset on Gaussian
inputs and on the trained model's q/k/v (`error_offsets`, the paired designs only), and reports every
source's logit offset q_i·k̄·scale (k̄: the mean key; mean and spread over rows), which places a trained
model's own keys on that sweep.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..attention.swap import attention_layers
from ..errors import UserError
from .measure import mean_std
from .variants import REFERENCE, BenchConfig, Variant, build_variant, gaussian_qkv, rel_error, supports, variants


def offset_qkv(cfg: BenchConfig, n: int, seed: int, device, dtype):
    """Gaussian q, k, v whose queries are moved by a·e (e: a random unit vector, a = cfg.error_query_mean), so
    that a common key offset can shift the mean logit: with centred queries mean_i q_i·u is 0 for every u."""
    if cfg.error_query_mean <= 0:
        raise UserError("error_query_mean must be positive: with centred queries no key offset shifts the mean logit")
    q, k, v = gaussian_qkv(cfg, n, seed, "cpu", torch.float32)
    e = torch.randn(cfg.head_dim, generator=torch.Generator().manual_seed(seed + 1))
    q = q + cfg.error_query_mean * e / e.norm()
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)]


def shift_keys(q: torch.Tensor, k: torch.Tensor, logit_offset: float) -> torch.Tensor:
    """k + u with one u per kv head, along its queries' mean q̄, sized so that mean_i q_i·u·scale = logit_offset
    (row i's own shift q_i·u·scale spreads around that mean). Exact attention does not change."""
    g = q.shape[1] // k.shape[1]
    qbar = q.double().mean(2).view(q.shape[0], k.shape[1], g, -1).mean(2)  # [B, Hkv, D]
    u = qbar * (logit_offset * math.sqrt(q.shape[-1]) / qbar.pow(2).sum(-1, keepdim=True).clamp_min(1e-30))
    return (k.double() + u.unsqueeze(2)).to(k.dtype)


def logit_offset_stats(q: torch.Tensor, k: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation over rows (queries × heads) of q_i·k̄·scale, k̄ = the head's mean key: the
    part of row i's logits that the keys' common component contributes (what attended zero keys lack)."""
    kbar = k.double().mean(2, keepdim=True).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    shift = (q.double() * kbar).sum(-1) / math.sqrt(q.shape[-1])
    return float(shift.mean()), float(shift.std())


def capture_qkv(model, idx: torch.Tensor, layer: int = -1):
    """Run `model` on tokens `idx` and return the (q, k, v) that attention layer `layer` hands its kernel
    (after projections, transforms and rotary): the inputs a replacement kernel would see."""
    layers = attention_layers(model)
    if not layers:
        raise UserError("the model has no attention layers")
    target = layers[layer].kernel
    seen = {}

    def hook(_mod, args, kwargs):
        seen["qkv"] = tuple(a.detach().clone() for a in args[:3])
        seen["causal"] = kwargs.get("causal", False)

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(idx)
    finally:
        handle.remove()
    return seen["qkv"], seen["causal"]


def captured_from_checkpoint(cfg: BenchConfig, device):
    """q, k, v of one layer of a trained attnlab LM reading `capture_len` tokens of validation text."""
    from ..data.text import TextCorpus
    from ..run.load import load_run

    run = load_run(cfg.checkpoint)
    model, data = run.model, run.data
    path = cfg.text or data.path
    if not path:
        raise UserError("pass --text: the checkpoint does not name the text it was trained on")
    n = cfg.capture_len or model.cfg.max_seq_len
    if n > model.cfg.max_seq_len:
        if model.cfg.pos != "rope":
            raise UserError(f"capture_len {n} is longer than the model's max_seq_len {model.cfg.max_seq_len}")
        model.cfg.max_seq_len = n  # rotary positions have no table: longer inputs only leave the trained range
    corpus = TextCorpus(path, run.tokenizer, val_fraction=data.val_fraction)
    split = "val" if len(corpus.val) > n else "train"
    x, _ = next(corpus.eval_windows(split, n, 1))
    model.to(device).eval()
    (q, k, v), causal = capture_qkv(model, x.to(device), cfg.capture_layer)
    return q, k, v, causal, f"{cfg.checkpoint} layer {cfg.capture_layer}, {n} tokens of {Path(path).name}"


def default_sources(cfg: BenchConfig, device, dtype, designs: set[str]) -> list:
    """Gaussian at cfg.error_lengths, the key-offset sweep at the first of them (paired designs only), and
    q/k/v captured from cfg.checkpoint when given."""
    sources = [(f"gaussian n={n}", gaussian_qkv(cfg, n, cfg.seed + 7 * n, device, dtype)) for n in cfg.error_lengths]
    if cfg.error_lengths:
        n = cfg.error_lengths[0]
        q, k, v = offset_qkv(cfg, n, cfg.seed + 7 * n, device, dtype)
        sources += [(f"gaussian n={n}, query mean {cfg.error_query_mean:g}, key offset {off:+g}",
                     (q, shift_keys(q, k, off), v), designs) for off in cfg.error_offsets]
    if cfg.checkpoint:
        # Captured from a causal LM, but valid inputs for both modes.
        q, k, v, _, what = captured_from_checkpoint(cfg, device)
        q, k, v = [t.to(dtype) for t in (q, k, v)]
        sources.append((f"trained LM ({what})", (q, k, v)))
        sources += [(f"trained LM, key offset {off:+g}", (q, shift_keys(q, k, off), v), designs)
                    for off in cfg.error_offsets if off != 0]
    return sources


def error_rows(cfg: BenchConfig, device, dtype, log=print, sources: list | None = None) -> list[dict]:
    """Error at equal sizes on `sources` [(label, (q, k, v)) or (label, (q, k, v), variant labels to run)];
    default: `default_sources`."""
    vs = [v for v in variants(cfg, "error") if v.name != REFERENCE]
    designs = {v.label for v in vs if v.pair} | {v.base for v in vs if v.pair}  # paired designs, their mechanisms
    if sources is None:
        sources = default_sources(cfg, device, dtype, designs)
    rows = []
    for label, (q, k, v), *only in sources:
        offset, offset_sd = logit_offset_stats(q, k)
        for mode in cfg.modes:
            causal = mode == "causal"
            with torch.no_grad():
                ref, ref_lse = build_variant(Variant(REFERENCE, REFERENCE, {}))(q, k, v, causal=causal, return_lse=True)
                outs = {}  # (label, seed) -> (o, lse) of the mechanisms a design is paired with
                for var in vs:
                    if not supports(var, mode) or (only and var.label not in only[0]):
                        continue
                    errs, paired = [], []
                    for s in range(cfg.error_seeds):
                        torch.manual_seed(cfg.seed + s)
                        kern = build_variant(var, seed=cfg.seed + s)
                        o, lse = kern(q, k, v, causal=causal, return_lse=True) if var.label in designs else (
                            kern(q, k, v, causal=causal), None)
                        errs.append(rel_error(o, ref))
                        if var.label in designs and not var.pair:
                            outs[var.label, s] = (o, lse)
                        elif var.pair and (var.base, s) in outs:
                            paired.append(_differing_rows_errors(outs[var.base, s], (o, lse), (ref, ref_lse)))
                    row = {"source": label, "n": q.shape[2], "mode": mode, "variant": var.label,
                           "mean_logit_offset": offset, "logit_offset_sd": offset_sd,
                           **dict(zip(("rel_err_mean", "rel_err_std"), mean_std(errs))), "seeds": len(errs)}
                    msg = f"  {label} {mode} {var.label}: rel err {row['rel_err_mean']:.4g} ± {row['rel_err_std']:.2g}"
                    if paired:
                        # Same seed, same draws: the outputs differ exactly on the rows the designs treat apart.
                        rows_, base_d, var_d = var.pair
                        keys = (f"{rows_}_share", f"rel_err_{rows_}_{base_d}", f"rel_err_{rows_}_{var_d}",
                                f"lse_err_{rows_}_{base_d}", f"lse_err_{rows_}_{var_d}")
                        row.update(zip(keys, (sum(column) / len(paired) for column in zip(*paired))))
                        msg += (f"; {rows_}: rel err {base_d} {row[keys[1]]:.4g} / {var_d} {row[keys[2]]:.4g}, "
                                f"|lse err| {base_d} {row[keys[3]]:.4g} / {var_d} {row[keys[4]]:.4g}")
                    rows.append(row)
                    log(msg)
    return rows


def _differing_rows_errors(base, variant, exact):
    """On the query rows where the two designs differ: their share, the relative output error of each, and
    the mean |lse − lse_exact| of each."""
    (o_b, l_b), (o_v, l_v), (ref, ref_lse) = base, variant, exact
    hit = (o_b != o_v).any(-1)
    if not bool(hit.any()):
        return 0.0, 0.0, 0.0, 0.0, 0.0
    lse_err = lambda lse: float((lse[hit].double() - ref_lse[hit].double()).abs().mean())
    return (float(hit.float().mean()), rel_error(o_b[hit], ref[hit]), rel_error(o_v[hit], ref[hit]),
            lse_err(l_b), lse_err(l_v))
