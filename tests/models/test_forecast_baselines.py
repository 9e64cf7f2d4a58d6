import numpy as np
import pytest
import torch

from attnlab.errors import UserError
from attnlab.models.forecast_baselines import (
    DLinear,
    DLinearConfig,
    LSTMForecaster,
    LSTMForecasterConfig,
    estimate_period,
    last_value_forecast,
    moving_average,
    seasonal_naive_forecast,
)


def test_last_value_and_seasonal_naive_match_a_loop():
    x = torch.randn(3, 30, 2, dtype=torch.float64)
    lv = last_value_forecast(x, 7)
    sn = seasonal_naive_forecast(x, 17, period=5)
    for b in range(3):
        for c in range(2):
            for h in range(7):
                assert lv[b, h, c] == x[b, -1, c]
            for h in range(17):
                # the most recent look-back point that is a whole number of periods before step h
                k = h
                while 30 + k >= 30:
                    k -= 5
                assert sn[b, h, c] == x[b, 30 + k, c]
    with pytest.raises(UserError, match="between 1 and the look-back"):
        seasonal_naive_forecast(x, 4, period=31)


def sine(n, period, noise=0.0, trend=0.0, seed=0, phase=0.3):
    t = np.arange(n)
    g = np.random.default_rng(seed)
    return np.sin(2 * np.pi * t / period + phase) + trend * t + noise * g.standard_normal(n)


@pytest.mark.parametrize("period", [7, 12, 24, 52])
def test_period_estimate_on_a_sine_of_known_period(period):
    assert estimate_period(sine(1500, period, noise=0.3, trend=0.004)) == period


def test_period_estimate_multichannel_and_limits():
    both = np.stack([sine(800, 24, 0.2, seed=1), 3 * sine(800, 24, 0.2, seed=2, phase=2.0)], axis=1)
    assert estimate_period(both) == 24
    # A period longer than the search range cannot be found; the estimate then says "no seasonality".
    assert estimate_period(sine(2000, 200, 0.1), max_period=100) == 1
    assert estimate_period(np.arange(50.0)) == 1  # a pure trend: nothing left after detrending


def test_period_estimate_on_white_noise_rarely_finds_one():
    g = np.random.default_rng(0)
    found = sum(estimate_period(g.standard_normal(400)) != 1 for _ in range(40))
    # Designed for a 5 % false-positive rate: more than 8 of 40 has probability below 0.1 %.
    assert found <= 8


def test_moving_average_matches_numpy():
    x = torch.randn(2, 20, 3, dtype=torch.float64)
    k = 5
    got = moving_average(x, k).numpy()
    xn = x.numpy()
    padded = np.concatenate([np.repeat(xn[:, :1], 2, axis=1), xn, np.repeat(xn[:, -1:], 2, axis=1)], axis=1)
    want = np.stack([padded[:, i:i + k].mean(axis=1) for i in range(20)], axis=1)
    np.testing.assert_allclose(got, want, atol=1e-12)


def trend_windows(n_windows, lookback, horizon, g):
    """Windows of lines with random level and slope plus small noise: each x [L, 1], y [H, 1]."""
    t = torch.arange(lookback + horizon, dtype=torch.float32)
    level = torch.randn(n_windows, 1, generator=g)
    slope = torch.randn(n_windows, 1, generator=g) * 0.1
    s = level + slope * t + 0.01 * torch.randn(n_windows, lookback + horizon, generator=g)
    return s[:, :lookback, None], s[:, lookback:, None]


def test_dlinear_learns_a_linear_trend():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = DLinear(DLinearConfig(lookback=32, horizon=8, kernel_size=5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        x, y = trend_windows(64, 32, 8, g)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = trend_windows(512, 32, 8, g)
    with torch.no_grad():
        mse = ((model(x) - y) ** 2).mean().item()
        last = ((last_value_forecast(x, 8) - y) ** 2).mean().item()
    # A trend of slope ~0.1 makes last value miss by ~0.1·h; DLinear should extrapolate it to near the noise.
    assert mse < 0.02 * last, (mse, last)


def test_dlinear_individual_and_errors():
    model = DLinear(DLinearConfig(lookback=16, horizon=4, individual=True, n_channels=3))
    assert model(torch.randn(2, 16, 3)).shape == (2, 4, 3)
    with pytest.raises(UserError, match="3 channel"):
        model(torch.randn(2, 16, 2))
    with pytest.raises(UserError, match="kernel_size must be odd"):
        DLinearConfig(kernel_size=4)
    with pytest.raises(UserError, match="lookback"):
        DLinearConfig(lookback=0)


def test_lstm_shapes_loss_and_revin_equivariance():
    torch.manual_seed(0)
    model = LSTMForecaster(LSTMForecasterConfig(lookback=24, horizon=6, hidden=8, n_layer=2)).double().eval()
    x, y = torch.randn(3, 24, 2, dtype=torch.float64), torch.randn(3, 6, 2, dtype=torch.float64)
    pred, loss = model(x, y)
    assert pred.shape == (3, 6, 2)
    torch.testing.assert_close(loss, ((pred - y) ** 2).mean().float())
    torch.testing.assert_close(model(4 * x - 7), 4 * model(x) - 7, rtol=1e-10, atol=1e-9)
    with pytest.raises(UserError, match="hidden"):
        LSTMForecasterConfig(hidden=0)
