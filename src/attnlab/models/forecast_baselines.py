"""Forecasting baselines: last value and seasonal naive (no training), DLinear and an LSTM (trained).

The trained ones share the Transformer forecaster's call, forward(x [B, lookback, C], targets=None) ->
pred [B, horizon, C] or (pred, MSE), and a `cfg` with `lookback` and `horizon`, so the same task and trainer
train every one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .forecast import RevIN, check_input, forecast_loss


# ----------------------------------------------------------------------------------------------------------
# Without training.

def last_value_forecast(x: torch.Tensor, horizon: int) -> torch.Tensor:
    """Repeat each series' newest point: x [B, L, C] -> [B, horizon, C]."""
    return x[:, -1:, :].expand(-1, horizon, -1).clone()


def seasonal_naive_forecast(x: torch.Tensor, horizon: int, period: int) -> torch.Tensor:
    """Repeat the look-back's last full season: step h takes the value one period (or several) earlier."""
    if not 1 <= period <= x.shape[1]:
        raise UserError(f"seasonal period {period} must be between 1 and the look-back length {x.shape[1]}")
    idx = x.shape[1] - period + torch.arange(horizon, device=x.device) % period
    return x[:, idx, :]


def estimate_period(series: np.ndarray, max_period: int | None = None, min_period: int = 2,
                    tolerance: float = 0.9) -> int:
    """The seasonal period of `series` ([T] or [T, C], the training split) from its autocorrelation.

    The series is linearly detrended (a trend would make every lag look alike), the autocorrelation averaged
    over channels, and among its local maxima at lags min_period..max_period the shortest one whose value
    reaches `tolerance` times the highest is the period: multiples of a period peak almost as high, so the
    shortest strong peak is the period itself rather than a harmonic. A peak counts only above white noise's
    band z/sqrt(T), z the two-sided 5 % quantile Bonferroni-corrected over the lags searched (so noise alone
    rarely yields a period); without one the answer is 1 (no seasonality: seasonal naive = last value).
    """
    from scipy.stats import norm
    from statsmodels.tsa.stattools import acf

    y = np.asarray(series, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    t_len = y.shape[0]
    max_lag = min(max_period or t_len // 2, t_len - 2)
    if max_lag < max(min_period, 2):
        return 1
    t = np.arange(t_len)
    curves = []
    for col in y.T:
        resid = col - np.polyval(np.polyfit(t, col, 1), t)
        if resid.std() <= 1e-12 * max(1.0, np.abs(col).max()):
            continue
        curves.append(acf(resid, nlags=max_lag + 1, fft=True))
    if not curves:
        return 1
    r = np.mean(curves, axis=0)
    lags = np.arange(max(min_period, 2), max_lag + 1)
    band = norm.ppf(1 - 0.025 / len(lags)) / np.sqrt(t_len)
    peaks = lags[(r[lags] > r[lags - 1]) & (r[lags] >= r[lags + 1]) & (r[lags] > band)]
    if len(peaks) == 0:
        return 1
    best = r[peaks].max()
    return int(peaks[r[peaks] >= tolerance * best][0])


# ----------------------------------------------------------------------------------------------------------
# DLinear (Zeng et al. 2023, "Are Transformers Effective for Time Series Forecasting?").

@dataclass
class DLinearConfig:
    lookback: int = 336
    horizon: int = 96
    kernel_size: int = 25  # moving-average window of the trend (odd)
    individual: bool = False  # one pair of linear maps per channel instead of shared
    n_channels: int = 1  # channels of the series; only `individual` depends on it

    def __post_init__(self):
        bad = [k for k in ("lookback", "horizon", "kernel_size", "n_channels")
               if not isinstance(getattr(self, k), int) or getattr(self, k) < 1]
        if bad:
            raise UserError(f"dlinear model: {', '.join(bad)} must be positive integers")
        if self.kernel_size % 2 == 0:
            raise UserError(f"dlinear model: kernel_size must be odd, got {self.kernel_size}")


def moving_average(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Centred moving average over dim 1 of [B, L, C], the ends padded by repeating the end points."""
    pad = (kernel_size - 1) // 2
    z = torch.cat([x[:, :1].expand(-1, pad, -1), x, x[:, -1:].expand(-1, pad, -1)], dim=1)
    return F.avg_pool1d(z.transpose(1, 2), kernel_size, stride=1).transpose(1, 2)


class DLinear(nn.Module):
    """Trend = moving average of the look-back, seasonal = the rest; one linear map of each to the horizon."""

    def __init__(self, cfg: DLinearConfig):
        super().__init__()
        self.cfg = cfg
        n = cfg.n_channels if cfg.individual else 1
        # The reference code starts both maps at the mean of the look-back, a sensible first forecast.
        self.w_seasonal = nn.Parameter(torch.full((n, cfg.horizon, cfg.lookback), 1.0 / cfg.lookback))
        self.w_trend = nn.Parameter(torch.full((n, cfg.horizon, cfg.lookback), 1.0 / cfg.lookback))
        bound = cfg.lookback ** -0.5
        self.b_seasonal = nn.Parameter(torch.empty(n, cfg.horizon).uniform_(-bound, bound))
        self.b_trend = nn.Parameter(torch.empty(n, cfg.horizon).uniform_(-bound, bound))

    def forward(self, x, targets=None):
        check_input(self.cfg, x)
        if self.cfg.individual and x.shape[2] != self.cfg.n_channels:
            raise UserError(f"this DLinear was built for {self.cfg.n_channels} channel(s), the input has {x.shape[2]}")
        trend = moving_average(x, self.cfg.kernel_size)
        seasonal = x - trend
        # [B, L, C] x [C|1, H, L] -> [B, H, C]
        y = (torch.einsum("blc,chl->bhc", seasonal, self.w_seasonal.expand(x.shape[2], -1, -1))
             + torch.einsum("blc,chl->bhc", trend, self.w_trend.expand(x.shape[2], -1, -1))
             + (self.b_seasonal + self.b_trend).T)
        if targets is None:
            return y
        return y, forecast_loss(y, targets)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------------------
# LSTM.

@dataclass
class LSTMForecasterConfig:
    lookback: int = 336
    horizon: int = 96
    hidden: int = 128
    n_layer: int = 2
    dropout: float = 0.0
    revin: bool = True  # the same instance normalisation as the Transformer, for a like-for-like comparison

    def __post_init__(self):
        bad = [k for k in ("lookback", "horizon", "hidden", "n_layer")
               if not isinstance(getattr(self, k), int) or getattr(self, k) < 1]
        if bad:
            raise UserError(f"lstm model: {', '.join(bad)} must be positive integers")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError("lstm model: dropout must be in [0, 1)")


class LSTMForecaster(nn.Module):
    """Channel-independent LSTM encoder over the look-back; its last state maps linearly to the horizon."""

    def __init__(self, cfg: LSTMForecasterConfig):
        super().__init__()
        self.cfg = cfg
        self.revin = RevIN() if cfg.revin else None
        self.lstm = nn.LSTM(1, cfg.hidden, cfg.n_layer, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.head = nn.Linear(cfg.hidden, cfg.horizon)

    def forward(self, x, targets=None):
        check_input(self.cfg, x)
        b, length, c = x.shape
        stats = None
        if self.revin is not None:
            x, stats = self.revin.normalise(x)
        _, (h, _) = self.lstm(x.transpose(1, 2).reshape(b * c, length, 1))
        y = self.head(h[-1]).view(b, c, self.cfg.horizon).transpose(1, 2)
        if self.revin is not None:
            y = self.revin.denormalise(y, stats)
        if targets is None:
            return y
        return y, forecast_loss(y, targets)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
