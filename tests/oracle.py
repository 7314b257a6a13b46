"""The oracles: pandas (every stat, per key, offline) and an exact one (Fraction) for the window contract."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from streamd.config import SignalSpec, load_config


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


def check_records_against_pandas(records: list[dict[str, Any]], ticks: list[dict[str, Any]], config_path: Path) -> int:
    """Every record equals pandas' value for its key at its event time; returns records checked."""
    specs = {s.name: s for s in load_config(config_path).signals}
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for tick in ticks:
        by_key[tick["k"]].append(tick)
    frames = {}
    checked = 0
    for record in records:
        spec = specs[record["signal"]]
        key = record["k"]
        if (spec.name, key) not in frames:
            own = by_key[key]
            t = np.array([x["t"] for x in own], np.int64)
            frames[spec.name, key] = (t, expected_frame(t, [x["p"] for x in own], [x["q"] for x in own], spec))
        t, frame = frames[spec.name, key]
        row = int(np.searchsorted(t, record["t"]))
        assert t[row] == record["t"], f"record time {record['t']} is not a tick of {key}"
        for stat in spec.stats:
            got, want = as_float(record[stat]), float(frame[stat].iloc[row])
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=f"{spec.name}.{key}.{stat} row {row}")
        checked += 1
    return checked


# The exact oracle: every window stat from the float inputs with rational arithmetic, rounded once.

ZERO_SHARE = 1e-2  # where a stat is near zero, its tolerance follows this share of the window's magnitude


def exact_window_stats(p: Sequence[float], q: Sequence[float]) -> dict[str, float]:
    """Every window stat of one window (oldest tick first), exact up to the final rounding.

    ``Fraction`` holds each float exactly, so sums, mean, variance and vwap are exact rationals;
    only std (a square root) and zscore are rounded twice. NaN marks an undefined stat.
    """
    prices, quantities = [Fraction(x) for x in p], [Fraction(x) for x in q]
    n = len(prices)
    total = sum(prices, Fraction(0))
    mean = total / n
    var = sum(((x - mean) ** 2 for x in prices), Fraction(0)) / (n - 1) if n > 1 else None
    volume = sum(quantities, Fraction(0))
    traded = any(quantities)
    vwap = sum((x * y for x, y in zip(prices, quantities, strict=True)), Fraction(0)) / volume if traded else None
    std = math.sqrt(var) if var is not None else math.nan
    return {
        "count": float(n),
        "sum": float(total),
        "mean": float(mean),
        "var": math.nan if var is None else float(var),
        "std": std,
        "zscore": float(prices[-1] - mean) / std if var else math.nan,
        "min": float(min(prices)),
        "max": float(max(prices)),
        "first": float(prices[0]),
        "last": float(prices[-1]),
        "volume": float(volume),
        "vwap": math.nan if vwap is None else float(vwap),
    }


def exact_tolerance(stat: str, p: Sequence[float], rtol: float) -> float:
    """Absolute tolerance of ``stat`` besides ``rtol`` relative: where exact values sit near zero.

    A sum or mean straddling zero is held to ``rtol`` of ZERO_SHARE of the window's magnitude
    (sum |p|, or mean |p| for mean and vwap); a zscore to ``rtol`` of 1 (its natural unit).
    count, first, last, min, max, volume, var and std get no absolute slack at all: they are
    exact, or relative to a value that is 0 only when it is exactly 0.
    """
    magnitude = math.fsum(abs(x) for x in p)
    if stat == "sum":
        return rtol * ZERO_SHARE * magnitude
    if stat in ("mean", "vwap"):
        return rtol * ZERO_SHARE * magnitude / len(p)
    if stat == "zscore":
        return rtol
    return 0.0
