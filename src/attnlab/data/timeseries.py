"""Time series for forecasting: a CSV or Parquet file, or a series that statsmodels ships (`builtin:NAME`).

Pipeline: read -> pick the time column and numeric target columns -> drop leading rows until every target has
an observation -> fill later gaps forward -> chronological train/val/test split -> standardise with the
training split's mean and standard deviation -> sliding windows of `lookback` inputs and `horizon` targets.

Split convention (the one of the long-horizon literature, Informer/PatchTST): a split's windows have all their
*targets* inside the split, while the look-back of a validation or test window may reach into the split before
it (that past is observed, so nothing leaks). Hence the training split needs lookback + horizon points, the
validation and test splits `horizon` points each.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from ..errors import UserError, require_file

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")


# ----------------------------------------------------------------------------------------------------------
# Built-in series: data files inside the statsmodels wheel, so no network is needed.

def _co2():
    from statsmodels.datasets import co2

    df = co2.load_pandas().data
    return df.rename_axis("date").reset_index()


def _elnino():
    import pandas as pd
    from statsmodels.datasets import elnino

    wide = elnino.load_pandas().data  # one row per year, one column per month
    years = wide["YEAR"].astype(int).to_numpy()
    values = wide.drop(columns="YEAR").to_numpy(dtype=float).ravel()
    dates = pd.date_range(f"{years[0]}-01-01", periods=len(values), freq="MS")
    return pd.DataFrame({"date": dates, "sst": values})


def _sunspots():
    from statsmodels.datasets import sunspots

    df = sunspots.load_pandas().data
    return df.assign(YEAR=df["YEAR"].astype(int))


def _macrodata():
    import pandas as pd
    from statsmodels.datasets import macrodata

    df = macrodata.load_pandas().data
    dates = pd.PeriodIndex.from_fields(year=df["year"].astype(int), quarter=df["quarter"].astype(int),
                                       freq="Q").to_timestamp()
    values = df.drop(columns=["year", "quarter"])
    values.insert(0, "date", dates)
    return values


def _nile():
    from statsmodels.datasets import nile

    df = nile.load_pandas().data
    return df.assign(year=df["year"].astype(int))


@dataclass(frozen=True)
class Builtin:
    loader: Callable
    time_column: str
    period: int  # the known seasonal period (1: none)
    description: str


BUILTINS: dict[str, Builtin] = {
    "co2": Builtin(_co2, "date", 52, "Mauna Loa CO2, weekly 1958-2001, 2284 points, 59 missing, yearly cycle of 52"),
    "elnino": Builtin(_elnino, "date", 12, "El Nino sea-surface temperature, monthly 1950-2010, 732 points"),
    "sunspots": Builtin(_sunspots, "YEAR", 11, "yearly sunspot activity 1700-2008, 309 points, ~11-year cycle"),
    "macrodata": Builtin(_macrodata, "date", 1, "US macroeconomic series, quarterly 1959-2009, 203 points, 12 columns"),
    "nile": Builtin(_nile, "year", 1, "Nile river flow at Aswan, yearly 1871-1970, 100 points"),
}
DEFAULT_SOURCE = "builtin:co2"


def read_frame(source: str | Path):
    """The raw table named by `source`: a .csv/.tsv/.txt or .parquet/.pq file, or `builtin:NAME`."""
    import pandas as pd

    s = str(source)
    if s.startswith("builtin:"):
        name = s.split(":", 1)[1]
        if name not in BUILTINS:
            raise UserError(f"unknown built-in series {name!r}; choose one of: {', '.join(BUILTINS)}")
        return BUILTINS[name].loader()
    path = require_file(s, "time-series file")
    if path.is_dir():
        raise UserError(f"time-series file is a folder: {path}; name a .csv or .parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise UserError("reading Parquet needs pyarrow: pip install 'attnlab[forecast]'") from None
            df = pd.read_parquet(path)
        elif suffix in (".csv", ".tsv", ".txt"):
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
        else:
            raise UserError(f"unknown time-series file type {suffix or '(none)'!r} for {path}; use .csv, .tsv or .parquet")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise UserError(f"time-series file has no data rows: {path}")
    return df


# ----------------------------------------------------------------------------------------------------------
# The loaded series.

@dataclass
class TimeSeries:
    """A multivariate series [T, C] in original units, its split and the training split's scaler.

    values: original units (gaps filled); scaled: (values - mean) / std; bounds: (train_end, val_end), so
    train = [0, train_end), val = [train_end, val_end), test = [val_end, T). times: the time column's
    values, or None. n_filled: values filled forward; n_dropped: leading rows dropped (a target was missing).
    """

    values: np.ndarray
    columns: list[str]
    bounds: tuple[int, int]
    mean: np.ndarray
    std: np.ndarray
    times: np.ndarray | None = None
    time_column: str | None = None
    source: str = ""
    n_filled: int = 0
    n_dropped: int = 0
    period: int | None = None  # known seasonal period of a built-in series
    scaled: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.scaled = (self.values - self.mean) / self.std

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def n_channels(self) -> int:
        return self.values.shape[1]

    def split_range(self, split: str) -> tuple[int, int]:
        a, b = self.bounds
        ranges = {"train": (0, a), "val": (a, b), "test": (b, len(self))}
        if split not in ranges:
            raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
        return ranges[split]

    def target_starts(self, split: str, lookback: int, horizon: int) -> np.ndarray:
        """Index of the first target of every window of `split` (the window's input is [t - lookback, t))."""
        lo, hi = self.split_range(split)
        first = lo + lookback if split == "train" else max(lo, lookback)
        return np.arange(first, hi - horizon + 1)

    def check_lengths(self, lookback: int, horizon: int) -> None:
        """Refuse a split that cannot hold one window, naming it and the minimum length it needs."""
        for split in SPLITS:
            lo, hi = self.split_range(split)
            need = lookback + horizon if split == "train" else horizon
            if hi - lo < need:
                raise UserError(
                    f"the {split} split has {hi - lo} points but lookback={lookback} + horizon={horizon} needs at "
                    f"least {need} there ({len(self)} points in all): shorten lookback/horizon or use a longer series")

    def windows(self, split: str, lookback: int, horizon: int, *, scaled: bool = True,
                index: np.ndarray | slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All windows of `split` in time order (or those picked by `index`): x [N, lookback, C], y [N, horizon, C]."""
        t = self.target_starts(split, lookback, horizon)
        if index is not None:
            t = t[index]
        data = self.scaled if scaled else self.values
        x = _gather(data, t - lookback, lookback)
        y = _gather(data, t, horizon)
        return torch.from_numpy(x).float(), torch.from_numpy(y).float()

    def random_windows(self, split: str, n: int, lookback: int, horizon: int, generator: torch.Generator):
        """`n` windows of `split` drawn uniformly with replacement from `generator` (scaled)."""
        count = len(self.target_starts(split, lookback, horizon))
        if count < 1:
            self.check_lengths(lookback, horizon)
        pick = torch.randint(count, (n,), generator=generator).numpy()
        return self.windows(split, lookback, horizon, index=pick)

    def inverse(self, scaled) -> np.ndarray | torch.Tensor:
        """Scaled values [..., C] back to original units."""
        if isinstance(scaled, torch.Tensor):
            std = torch.as_tensor(self.std, dtype=scaled.dtype, device=scaled.device)
            mean = torch.as_tensor(self.mean, dtype=scaled.dtype, device=scaled.device)
            return scaled * std + mean
        return np.asarray(scaled) * self.std + self.mean


def _gather(data: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    idx = starts[:, None] + np.arange(length)[None, :]
    return np.ascontiguousarray(data[idx])


def split_bounds(n: int, split: tuple[float, float, float]) -> tuple[int, int]:
    """(train_end, val_end) for fractions (train, val, test): train and test are floored, val takes the rest."""
    f = tuple(float(x) for x in split)
    if len(f) != 3 or any(x <= 0 for x in f) or abs(sum(f) - 1.0) > 1e-6:
        raise UserError(f"split must be three positive fractions (train, val, test) summing to 1, got {list(split)}")
    n_train, n_test = int(n * f[0]), int(n * f[2])
    return n_train, n - n_test


@dataclass
class SeriesConfig:
    """The data part of a forecasting run, typed for YAML and the CLI (see `load_series`).

    source: a .csv/.tsv/.parquet path or builtin:NAME; columns: target columns (empty: every numeric one);
    split: train/val/test fractions, in time order.
    """

    source: str = DEFAULT_SOURCE
    time_column: str | None = None
    columns: list[str] = field(default_factory=list)
    split: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])

    def load(self, lookback: int | None = None, horizon: int | None = None, log=None) -> "TimeSeries":
        return load_series(self.source, columns=self.columns or None, time_column=self.time_column,
                           split=tuple(self.split), lookback=lookback, horizon=horizon, log=log)


def load_series(source: str | Path = DEFAULT_SOURCE, *, columns: list[str] | None = None,
                time_column: str | None = None, split: tuple[float, float, float] = (0.7, 0.1, 0.2),
                lookback: int | None = None, horizon: int | None = None,
                log: Callable[[str], None] | None = None) -> TimeSeries:
    """Load, clean, split and scale a series; with lookback and horizon, check every split can hold a window.

    columns: target columns (default: every numeric column but the time column). time_column: optional; a
    built-in series names its own. Leading rows where a target is missing are dropped; later gaps are filled
    forward; both counts are returned on the TimeSeries and reported through `log` (default: stderr).
    """
    import pandas as pd

    say = log or (lambda msg: print(msg, file=sys.stderr))
    name = str(source)
    df = read_frame(source)
    df.columns = [str(c) for c in df.columns]
    period = None
    if name.startswith("builtin:"):
        b = BUILTINS[name.split(":", 1)[1]]
        time_column = time_column or b.time_column
        period = b.period
    if time_column is not None and time_column not in df.columns:
        raise UserError(f"time column {time_column!r} is not in {name}; columns: {', '.join(map(str, df.columns))}")
    candidates = [c for c in df.columns if c != time_column]
    numeric = [c for c in candidates if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
    if not columns:
        columns = numeric
        if not columns:
            raise UserError(f"{name} has no numeric column to forecast; columns: {', '.join(df.columns)}")
    columns = [str(c) for c in columns]
    for c in columns:
        if c not in candidates:
            raise UserError(f"unknown column {c!r} in {name}; valid: {', '.join(candidates)}")
        if c not in numeric:
            text = df[c].dropna()
            text = text[pd.to_numeric(text, errors="coerce").isna()]
            example = f" (e.g. {text.iloc[0]!r})" if len(text) else ""
            raise UserError(f"column {c!r} in {name} is not numeric{example}; numeric columns: {', '.join(numeric) or 'none'}")
    times = None
    if time_column is not None:
        times = df[time_column]
        if not pd.api.types.is_numeric_dtype(times) and not pd.api.types.is_datetime64_any_dtype(times):
            try:
                times = pd.to_datetime(times)
            except (ValueError, TypeError):
                raise UserError(f"time column {time_column!r} in {name} holds neither numbers nor dates") from None
        order = np.argsort(times.to_numpy(), kind="stable")
        if (np.diff(order) != 1).any():
            say(f"{name}: rows sorted by {time_column}")
            df, times = df.iloc[order], times.iloc[order]
        times = times.to_numpy()
    values = df[columns].to_numpy(dtype=np.float64, copy=True)
    values[~np.isfinite(values)] = np.nan
    missing = np.isnan(values)
    empty = [c for c, m in zip(columns, missing.all(axis=0)) if m]
    if empty:
        raise UserError(f"column(s) {', '.join(map(repr, empty))} in {name} hold no values")
    # Filling backwards would invent a flat history, so rows before every target has been seen are dropped.
    n_dropped = int(max(np.argmax(~missing, axis=0)))
    n_filled = int(missing[n_dropped:].sum())
    values = pd.DataFrame(values[n_dropped:]).ffill().to_numpy()
    if times is not None:
        times = times[n_dropped:]
    if n_dropped:
        say(f"{name}: dropped {n_dropped} leading row(s) before every target column had a value")
    if n_filled:
        say(f"{name}: filled {n_filled} missing value(s) forward")
    n = values.shape[0]
    train_end, val_end = split_bounds(n, split)
    if train_end < 2:
        raise UserError(f"{name} has {n} usable points: too few to split into train/val/test")
    train = values[:train_end]
    mean, std = train.mean(axis=0), train.std(axis=0)
    flat = [c for c, s, m in zip(columns, std, mean) if s <= 1e-12 * max(1.0, abs(m))]
    if flat:
        raise UserError(f"column(s) {', '.join(map(repr, flat))} of {name} are constant in the training split; "
                        f"nothing to forecast (drop them with columns)")
    ts = TimeSeries(values, columns, (train_end, val_end), mean, std, times, time_column, name, n_filled,
                    n_dropped, period)
    if lookback is not None and horizon is not None:
        ts.check_lengths(lookback, horizon)
    return ts


def future_times(times: np.ndarray | None, start: int, count: int) -> np.ndarray:
    """Time stamps of positions start .. start + count - 1: the series' own while it has them, then continued
    at its usual spacing (pandas' inferred frequency for dates); positions themselves without a time column."""
    if times is None or len(times) < 2:
        return np.arange(start, start + count)
    own = times[start:start + count]
    beyond = start + count - len(times)  # steps past the end, counted from the last known one
    extra = min(beyond, count)
    if extra <= 0:
        return own
    tail = times[-min(len(times), 64):]
    more = None
    if np.issubdtype(times.dtype, np.datetime64):
        import warnings

        import pandas as pd

        with warnings.catch_warnings():  # pandas 3 warns that it will return an offset, which date_range takes too
            warnings.simplefilter("ignore")
            freq = pd.infer_freq(pd.DatetimeIndex(tail)) if len(tail) >= 3 else None
        if freq is not None:
            more = pd.date_range(times[-1], periods=beyond + 1, freq=freq)[1:].to_numpy().astype(times.dtype)
    if more is None:
        step = np.median(np.diff(tail))
        more = times[-1] + step * np.arange(1, beyond + 1)
        if np.issubdtype(times.dtype, np.integer) and float(step).is_integer():
            more = more.astype(times.dtype)
    more = more[beyond - extra:]
    return np.concatenate([own, more])
