"""pandas as the oracle: every statistic of the window contract, computed per key offline."""

from __future__ import annotations

import numpy as np
import pandas as pd

from streamd.config import SignalSpec


def _first(values: np.ndarray) -> float:
    return float(values[0])


def expected_frame(t: np.ndarray, p: np.ndarray, q: np.ndarray, spec: SignalSpec) -> pd.DataFrame:
    """One row per tick of one key (accepted ticks, in order): the signal's stats at that tick.

    Times are rebased to the key's first tick before pandas sees them, so its float64
    conversion of nanoseconds is exact.
    """
    index = pd.to_datetime(np.asarray(t, np.int64) - int(t[0]), unit="ns")
    price = pd.Series(np.asarray(p, float), index=index)
    qty = pd.Series(np.asarray(q, float), index=index)
    if spec.window == "ewma":
        ewma = price.ewm(halflife=pd.Timedelta(spec.size, "ns"), times=index).mean()
        return pd.DataFrame({"ewma": ewma.to_numpy()})

    def roll(series: pd.Series) -> pd.core.window.rolling.Rolling:
        if spec.window == "time":
            return series.rolling(pd.Timedelta(spec.size, "ns"), closed="right")
        return series.rolling(spec.size, min_periods=1)

    mean = roll(price).mean()
    std = roll(price).std()
    volume = roll(qty).sum()
    pq = roll(price * qty).sum()
    frame = {
        "count": roll(price).count(),
        "sum": roll(price).sum(),
        "mean": mean,
        "std": std,
        "var": roll(price).var(),
        "min": roll(price).min(),
        "max": roll(price).max(),
        "first": roll(price).apply(_first, raw=True),
        "last": price,
        "volume": volume,
        "vwap": (pq / volume).where(volume != 0),
        "zscore": ((price - mean) / std).where(std.notna() & (std != 0)),
    }
    return pd.DataFrame({name: frame[name].to_numpy() for name in spec.stats})


def as_float(value: object) -> float:
    return float("nan") if value is None else float(value)  # type: ignore[arg-type]
