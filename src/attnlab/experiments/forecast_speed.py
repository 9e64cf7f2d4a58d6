"""Where subquadratic attention pays off for forecasting: one training step and one forecast of the patch
Transformer at look-backs far longer than the built-in series, for several mechanisms side by side.

Time and memory do not depend on the values, so the windows are random; every look-back builds each
mechanism's model from the same seed, and the steps are timed in turns (`bench.measure.interleaved`), so a
change in the machine's load falls on every mechanism alike. Memory is the peak of tensor memory allocated
by a training forward, the activations it keeps for backward included (the weights, their gradients and
AdamW's state excluded: at long look-backs the linear head's n_patches·d·horizon weights would hide the
attention's share), and by a forecast (`bench.memory.peak_memory`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from ..attention import AttentionSpec
from ..bench.measure import interleaved
from ..bench.memory import peak_memory
from ..report import line_plot
from ..run.forecast import ForecastModelConfig


@dataclass
class SpeedPlan:
    """The sweep: look-backs, mechanisms (name -> attention spec) and the model they share."""

    lookbacks: list[int]
    mechanisms: dict[str, AttentionSpec]
    horizon: int = 96
    patch_len: int = 8
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    batch_size: int = 4
    rounds: int = 3
    seed: int = 0
    channels: int = 1

    def model(self, lookback: int, spec: AttentionSpec) -> torch.nn.Module:
        cfg = ForecastModelConfig(patch_len=self.patch_len, stride=self.patch_len, n_layer=self.n_layer,
                                  n_head=self.n_head, d_model=self.d_model, dropout=0.0, attention=spec)
        return cfg.build(lookback, self.horizon, self.channels, seed=self.seed)

    def tokens(self, lookback: int) -> int:
        return (lookback - self.patch_len) // self.patch_len + 2  # patches, plus the one ending on the newest point


def _step_fns(model, x, y):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        model.train()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def train_forward():
        model.train()
        return model(x, y)[1]  # the loss holds the graph: what the forward keeps for backward

    @torch.no_grad()
    def forecast():
        model.eval()
        return model(x)

    return train_step, forecast, train_forward


def lookback_speed(plan: SpeedPlan, device, log=print) -> list[dict]:
    """One row per (look-back, mechanism): median seconds of a training step (forward, backward, AdamW) and of
    a forecast (forward, eval mode) over `rounds` turns, peak MB of a training forward (activations kept for
    backward) and of a forecast, and the ratios to the first mechanism (the reference, normally exact) at the
    same look-back."""
    rows = []
    g = torch.Generator().manual_seed(plan.seed)
    for lookback in plan.lookbacks:
        x = torch.randn(plan.batch_size, lookback, plan.channels, generator=g).to(device)
        y = torch.randn(plan.batch_size, plan.horizon, plan.channels, generator=g).to(device)
        fns = {}
        for name, spec in plan.mechanisms.items():
            fns[name] = _step_fns(plan.model(lookback, spec).to(device), x, y)
        train_t = interleaved({n: f[0] for n, f in fns.items()}, plan.rounds, device, alternate=True)
        infer_t = interleaved({n: f[1] for n, f in fns.items()}, plan.rounds, device, alternate=True)
        ref = next(iter(plan.mechanisms))
        group = []
        for name, (_, forecast, train_forward) in fns.items():
            _, train_peak = peak_memory(train_forward, device)
            _, infer_peak = peak_memory(forecast, device)
            group.append({"lookback": lookback, "tokens": plan.tokens(lookback), "mechanism": name,
                          "train_s": statistics.median(train_t[name]), "infer_s": statistics.median(infer_t[name]),
                          "train_act_MB": train_peak / 2**20, "infer_peak_MB": infer_peak / 2**20})
        base = next(r for r in group if r["mechanism"] == ref)
        for r in group:
            r["train_vs_" + ref] = r["train_s"] / base["train_s"]
            r["infer_vs_" + ref] = r["infer_s"] / base["infer_s"]
            r["train_mem_vs_" + ref] = r["train_act_MB"] / base["train_act_MB"] if base["train_act_MB"] else None
        rows += group
        log(f"   look-back {lookback} ({plan.tokens(lookback)} tokens): "
            + ", ".join(f"{r['mechanism']} train {r['train_s']:.3f} s / forecast {r['infer_s']:.3f} s" for r in group))
        del fns
    return rows


def crossovers(rows: list[dict], ref: str = "exact", margin: float = 0.1) -> dict[str, dict]:
    """Per mechanism: the shortest look-back from which its training step (and its forecast) takes at most
    1 - `margin` of `ref`'s time at every longer look-back measured, or None. The margin keeps a mechanism
    that runs `ref`'s own code (SSA forecasts run exact attention) from "winning" on timing noise."""
    out = {}
    for name in dict.fromkeys(r["mechanism"] for r in rows):
        if name == ref:
            continue
        mine = sorted((r for r in rows if r["mechanism"] == name), key=lambda r: r["lookback"])
        out[name] = {}
        for key in ("train", "infer"):
            first = None
            for r in reversed(mine):
                if r[f"{key}_vs_{ref}"] <= 1.0 - margin:
                    first = r["lookback"]
                else:
                    break
            out[name][key] = first
    return out


def speed_plots(rows: list[dict], out, plan: SpeedPlan) -> list:
    names = list(dict.fromkeys(r["mechanism"] for r in rows))

    def series(key):
        return {n: ([r["lookback"] for r in rows if r["mechanism"] == n], [r[key] for r in rows if r["mechanism"] == n])
                for n in names}

    shape = f"patch {plan.patch_len}, batch {plan.batch_size}"
    return [
        line_plot(out / "speed_train.png", series("train_s"), xlabel="look-back (points)", logx=True, logy=True,
                  ylabel="seconds per training step", title=f"Training step vs look-back ({shape})"),
        line_plot(out / "speed_forecast.png", series("infer_s"), xlabel="look-back (points)", logx=True, logy=True,
                  ylabel="seconds per forecast", title=f"Forecast vs look-back ({shape})"),
        line_plot(out / "speed_memory.png", series("train_act_MB"), xlabel="look-back (points)", logx=True,
                  logy=True, ylabel="peak MB of a training forward (kept for backward)",
                  title="Training activation memory vs look-back"),
    ]
