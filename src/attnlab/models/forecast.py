"""A patch Transformer forecaster (PatchTST, Nie et al. 2023) whose attention comes from the registry.

    x [B, lookback, C] -> instance normalisation per series (RevIN) -> each channel on its own (channel
    independence: the C series share every weight) -> patches of `patch_len` points every `stride` points are
    the tokens -> linear patch embedding + positions -> non-causal pre-norm Transformer encoder -> flatten all
    patch outputs -> one linear map to the whole horizon -> RevIN statistics restored -> [B, horizon, C].

The attention layers are those of the language model (`build_attention_layers`): `cfg.attention` picks the
mechanism, its layers and an optional key/value transform; the registry refuses a mechanism without the
non-causal capability with one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionSpec
from ..attention.positions import sinusoidal_table
from ..errors import UserError
from .blocks import Block, make_norm
from .lm import build_attention_layers


@dataclass
class ForecastConfig:
    lookback: int = 336  # input points per window
    horizon: int = 96  # points predicted at once
    patch_len: int = 16
    stride: int = 8
    pad_end: bool = True  # repeat the last point `stride` times: one more patch that ends on the newest point
    n_layer: int = 3
    n_head: int = 4
    n_kv_head: int | None = None
    d_model: int = 128
    d_ff: int | None = None  # default 2·d_model (PatchTST's 128 -> 256)
    dropout: float = 0.1
    head_dropout: float = 0.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    pos: Literal["learned", "sinusoidal", "rope", "none"] = "learned"
    rope_base: float = 10000.0
    bias: bool = True
    revin: bool = True  # instance normalisation with the statistics restored at the output
    revin_affine: bool = False  # a learnt per-channel scale and shift inside RevIN (needs n_channels)
    n_channels: int = 1  # channels of the series; only affine RevIN depends on it
    attention: AttentionSpec = field(default_factory=AttentionSpec)

    def __post_init__(self):
        if isinstance(self.attention, dict):
            from ..config import from_dict

            self.attention = from_dict(AttentionSpec, self.attention, "attention")
        positive = ("lookback", "horizon", "patch_len", "stride", "n_layer", "n_head", "d_model", "n_channels")
        bad = [k for k in positive if not isinstance(getattr(self, k), int) or getattr(self, k) < 1]
        if bad:
            raise UserError(f"forecast model: {', '.join(bad)} must be positive integers")
        if self.lookback < self.patch_len:
            raise UserError(f"forecast model: lookback={self.lookback} is shorter than patch_len={self.patch_len}")
        if self.d_model % self.n_head:
            raise UserError(f"forecast model: d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise UserError(f"forecast model: n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.d_ff is not None and self.d_ff < 1:
            raise UserError("forecast model: d_ff must be positive")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.head_dropout < 1.0):
            raise UserError("forecast model: dropout and head_dropout must be in [0, 1)")
        choices = {"norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"),
                   "pos": ("learned", "sinusoidal", "rope", "none")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"forecast model: {key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.pos == "rope" and (self.d_model // self.n_head) % 2:
            raise UserError(f"forecast model: rope needs an even head dimension, d_model/n_head={self.d_model // self.n_head}")

    @property
    def n_patches(self) -> int:
        return (self.lookback - self.patch_len) // self.stride + 1 + (1 if self.pad_end else 0)


class RevIN(nn.Module):
    """Reversible instance normalisation (Kim et al. 2022): each series of each window is standardised over
    its look-back, and the model's output is mapped back with the same mean and scale.

    The scale is the standard deviation clamped below at `eps` rather than sqrt(var + eps), so that without
    the affine part, f(a·x + b) = a·f(x) + b holds exactly for a > 0 whenever the look-back is not flat.
    """

    def __init__(self, n_channels: int = 1, affine: bool = False, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(n_channels))
            self.bias = nn.Parameter(torch.zeros(n_channels))

    def normalise(self, x):
        """x [B, L, C] -> (normalised x, (mean, scale) [B, 1, C])."""
        mean = x.mean(dim=1, keepdim=True)
        scale = x.var(dim=1, keepdim=True, unbiased=False).sqrt().clamp_min(self.eps)
        z = (x - mean) / scale
        if self.affine:
            z = z * self.weight + self.bias
        return z, (mean, scale)

    def denormalise(self, y, stats):
        mean, scale = stats
        if self.affine:
            # A learnt weight may cross zero; keep its magnitude off zero so the inverse stays finite.
            w = self.weight
            w = torch.where(w.abs() < self.eps, torch.full_like(w, self.eps), w)
            y = (y - self.bias) / w
        return y * scale + mean


def forecast_loss(pred, targets):
    return F.mse_loss(pred.float(), targets.float())


def check_input(cfg, x) -> None:
    if x.dim() != 3 or x.shape[1] != cfg.lookback:
        raise UserError(f"forecast input must be [batch, lookback={cfg.lookback}, channels], got {list(x.shape)}")
    if getattr(cfg, "revin_affine", False) and x.shape[2] != cfg.n_channels:
        raise UserError(f"the model's affine RevIN was built for {cfg.n_channels} channel(s), the input has {x.shape[2]}")


class ForecastTransformer(nn.Module):
    def __init__(self, cfg: ForecastConfig):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.n_patches, cfg.d_model
        self.revin = RevIN(cfg.n_channels, cfg.revin_affine) if cfg.revin else None
        self.embed = nn.Linear(cfg.patch_len, d, bias=cfg.bias)
        if cfg.pos == "learned":
            self.pos_table = nn.Parameter(torch.empty(n, d).uniform_(-0.02, 0.02))
        elif cfg.pos == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(n, d), persistent=False)
        else:
            self.pos_table = None
        self.register_buffer("positions", torch.arange(n), persistent=False)
        attns = build_attention_layers(cfg, causal=False, rotary=cfg.pos == "rope")
        self.blocks = nn.ModuleList(Block(cfg, a, causal=False, d_ff=cfg.d_ff or 2 * cfg.d_model) for a in attns)
        self.ln_f = make_norm(cfg.norm, d, cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.head_drop = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(n * d, cfg.horizon)

    def forward(self, x, targets=None):
        """x: [B, lookback, C] -> prediction [B, horizon, C], or (prediction, MSE) when targets are given."""
        cfg = self.cfg
        check_input(cfg, x)
        b, length, c = x.shape
        stats = None
        if self.revin is not None:
            x, stats = self.revin.normalise(x)
        z = x.transpose(1, 2).reshape(b * c, length)
        if cfg.pad_end:
            z = torch.cat([z, z[:, -1:].expand(-1, cfg.stride)], dim=1)
        h = self.embed(z.unfold(-1, cfg.patch_len, cfg.stride))  # [B·C, patches, d]
        if self.pos_table is not None:
            h = h + self.pos_table
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, positions=self.positions)
        y = self.head(self.head_drop(self.ln_f(h).flatten(1)))  # [B·C, horizon]
        y = y.view(b, c, cfg.horizon).transpose(1, 2)
        if self.revin is not None:
            y = self.revin.denormalise(y, stats)
        if targets is None:
            return y
        return y, forecast_loss(y, targets)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def forecast_model_kinds() -> dict[str, tuple[type, type]]:
    """Every trainable forecaster by name: (config dataclass, model class); all share forward(x, targets=None)."""
    from .forecast_baselines import DLinear, DLinearConfig, LSTMForecaster, LSTMForecasterConfig

    return {"transformer": (ForecastConfig, ForecastTransformer), "dlinear": (DLinearConfig, DLinear),
            "lstm": (LSTMForecasterConfig, LSTMForecaster)}


def build_forecast_model(kind: str, options: dict | None = None, **overrides) -> nn.Module:
    """Build a forecaster by name from a plain dict (YAML, a checkpoint's record) plus keyword overrides."""
    from ..config import from_dict

    kinds = forecast_model_kinds()
    if kind not in kinds:
        raise UserError(f"unknown forecast model {kind!r}; choose one of: {', '.join(kinds)}")
    cfg_cls, model_cls = kinds[kind]
    return model_cls(from_dict(cfg_cls, {**(options or {}), **overrides}, f"{kind} model"))
