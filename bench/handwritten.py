"""What a user writes by hand: per-key deques, running sums, min/max recomputed per tick.

The same logic serves the "per-tick Python" contender and, inside a ``stateful_map``, Bytewax,
so the two differ only by the dataflow around it. Semantics follow the README's window contract
(time window ``t - W < t_i <= t``, sample std, ``zscore = (last - mean) / std``, EWMA with
weights ``0.5 ** ((t - t_i) / H)``).
"""

from __future__ import annotations

import math
from collections import deque

NAN = float("nan")

# Column order of a row produced by KeyWindows.update (and by every other contender's final rows).
COLUMNS = (
    "px1s.count",
    "px1s.mean",
    "px1s.std",
    "px1s.min",
    "px1s.max",
    "px1s.vwap",
    "px1s.last",
    "px1s.zscore",
    "mean100.mean",
    "mean100.std",
    "ewma1s.ewma",
)


def _std(n: int, s: float, ss: float) -> float:
    if n < 2:
        return NAN
    var = (ss - s * s / n) / (n - 1)
    return math.sqrt(var) if var > 0 else 0.0


class KeyWindows:
    """One key's three windows: time 1 s (8 stats), count 100 (mean, std), EWMA half-life 1 s."""

    __slots__ = (
        "cnt",
        "cnt_s",
        "cnt_ss",
        "e_den",
        "e_num",
        "e_t",
        "tw_p",
        "tw_q",
        "tw_s",
        "tw_spq",
        "tw_sq",
        "tw_ss",
        "tw_t",
    )

    def __init__(self) -> None:
        self.tw_t: deque[int] = deque()
        self.tw_p: deque[float] = deque()
        self.tw_q: deque[float] = deque()
        self.tw_s = self.tw_ss = self.tw_sq = self.tw_spq = 0.0
        self.cnt: deque[float] = deque()
        self.cnt_s = self.cnt_ss = 0.0
        self.e_num = self.e_den = 0.0
        self.e_t = 0

    def update(
        self,
        t: int,
        p: float,
        q: float,
        window_ns: int = 1_000_000_000,
        count: int = 100,
        half_life_ns: int = 1_000_000_000,
    ) -> tuple[float, ...]:
        """Add one tick and return the row of COLUMNS at that tick."""
        tw_t, tw_p, tw_q = self.tw_t, self.tw_p, self.tw_q
        tw_t.append(t)
        tw_p.append(p)
        tw_q.append(q)
        self.tw_s += p
        self.tw_ss += p * p
        self.tw_sq += q
        self.tw_spq += p * q
        horizon = t - window_ns
        while tw_t[0] <= horizon:
            tw_t.popleft()
            op = tw_p.popleft()
            oq = tw_q.popleft()
            self.tw_s -= op
            self.tw_ss -= op * op
            self.tw_sq -= oq
            self.tw_spq -= op * oq
        n = len(tw_t)
        mean = self.tw_s / n
        std = _std(n, self.tw_s, self.tw_ss)
        low, high = self._extremes(t, p, horizon)
        vwap = self.tw_spq / self.tw_sq if self.tw_sq > 0 else NAN
        zscore = (p - mean) / std if std > 0 else NAN

        cnt = self.cnt
        cnt.append(p)
        self.cnt_s += p
        self.cnt_ss += p * p
        if len(cnt) > count:
            old = cnt.popleft()
            self.cnt_s -= old
            self.cnt_ss -= old * old
        m = len(cnt)

        decay = 0.5 ** ((t - self.e_t) / half_life_ns) if self.e_den else 0.0
        self.e_num = self.e_num * decay + p
        self.e_den = self.e_den * decay + 1.0
        self.e_t = t
        return (
            float(n),
            mean,
            std,
            low,
            high,
            vwap,
            p,
            zscore,
            self.cnt_s / m,
            _std(m, self.cnt_s, self.cnt_ss),
            self.e_num / self.e_den,
        )

    def _extremes(self, t: int, p: float, horizon: int) -> tuple[float, float]:
        """Min and max of the time window, recomputed by scanning it (the obvious way)."""
        return min(self.tw_p), max(self.tw_p)


class KeyWindowsMonotonic(KeyWindows):
    """The careful hand-written version: min/max from monotonic deques (amortised O(1) per tick)."""

    __slots__ = ("hi_p", "hi_t", "lo_p", "lo_t")

    def __init__(self) -> None:
        super().__init__()
        self.lo_t: deque[int] = deque()
        self.lo_p: deque[float] = deque()
        self.hi_t: deque[int] = deque()
        self.hi_p: deque[float] = deque()

    def _extremes(self, t: int, p: float, horizon: int) -> tuple[float, float]:
        lo_t, lo_p, hi_t, hi_p = self.lo_t, self.lo_p, self.hi_t, self.hi_p
        while lo_p and lo_p[-1] >= p:
            lo_p.pop()
            lo_t.pop()
        lo_p.append(p)
        lo_t.append(t)
        while hi_p and hi_p[-1] <= p:
            hi_p.pop()
            hi_t.pop()
        hi_p.append(p)
        hi_t.append(t)
        while lo_t[0] <= horizon:
            lo_t.popleft()
            lo_p.popleft()
        while hi_t[0] <= horizon:
            hi_t.popleft()
            hi_p.popleft()
        return lo_p[0], hi_p[0]


VARIANTS: dict[str, type[KeyWindows]] = {"rescan": KeyWindows, "monotonic": KeyWindowsMonotonic}


def run_handwritten(
    keys: list[int], t: list[int], p: list[float], q: list[float], variant: str = "rescan"
) -> dict[int, tuple[float, ...]]:
    """Feed every tick through per-key windows of the given variant; return each key's last row."""
    make = VARIANTS[variant]
    states: dict[int, KeyWindows] = {}
    last: dict[int, tuple[float, ...]] = {}
    for key, time_ns, price, qty in zip(keys, t, p, q, strict=True):
        state = states.get(key)
        if state is None:
            state = states[key] = make()
        last[key] = state.update(time_ns, price, qty)
    return last
