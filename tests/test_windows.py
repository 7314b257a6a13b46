"""Rolling-window engine: every stat against pandas (and exact references), batch by batch.

A window at key k's newest tick t, for W = 5 (time) or N = 3 (count)::

    ticks   1   3   4   6   9   9          time W=5: (4, 9]  -> 6, 9, 9
                        [-------]          count N=3: last 3 -> 6, 9, 9
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamd.config import DEFAULT_SIGNALS, EWMA_STATS, WINDOW_STATS, SignalSpec
from streamd.windows import KERNEL, Engine, SignalResult, _EwmaState, _RingWindowState
from tests.oracle import exact_tolerance, exact_window_stats

RTOL, ATOL = 1e-9, 1e-12
# Engine(use_kernel=...) for each path: every batch through NumPy, or through the compiled kernel.
PATHS = {"numpy": False, "kernel": True}
Stream = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[int]]


def assert_close(actual: float, expected: float, what: str) -> None:
    if math.isnan(expected):
        assert math.isnan(actual), f"{what}: expected undefined, got {actual!r}"
        return
    assert not math.isnan(actual), f"{what}: expected {expected!r}, got undefined"
    assert math.isclose(actual, expected, rel_tol=RTOL, abs_tol=ATOL), f"{what}: {actual!r} != {expected!r}"


def agrees(actual: float, expected: float) -> bool:
    if math.isnan(expected) or math.isnan(actual):
        return math.isnan(expected) and math.isnan(actual)
    return math.isclose(actual, expected, rel_tol=RTOL, abs_tol=ATOL)


def window_of(spec: SignalSpec, t: np.ndarray, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prices and quantities inside the window at the key's newest tick (the window contract)."""
    inside = t > t[-1] - spec.size if spec.window == "time" else np.arange(t.size) >= t.size - spec.size
    return p[inside], q[inside]


def assert_exact(actual: float, stat: str, p: np.ndarray, q: np.ndarray, what: str) -> None:
    """Where pandas disagrees, the exact reference decides: pandas is a second opinion.

    pandas' rolling var/std accumulate rounding error (prices at 1e5 on a 0.25 grid are enough
    to put them 1e-9 off), so a disagreement is settled against Fraction arithmetic.
    """
    exact = exact_window_stats(p.tolist(), q.tolist())[stat]
    if math.isnan(exact):
        assert math.isnan(actual), f"{what}: exact is undefined, got {actual!r}"
        return
    tolerance = exact_tolerance(stat, p.tolist(), RTOL)
    assert math.isclose(actual, exact, rel_tol=RTOL, abs_tol=tolerance), f"{what}: {actual!r}, exact {exact!r}"


def pandas_window_row(spec: SignalSpec, t: np.ndarray, p: np.ndarray, q: np.ndarray) -> dict[str, float]:
    """Last row of every window stat, computed by pandas on one key's accepted ticks."""
    index = pd.DatetimeIndex(t - t[0])  # rebased so the float64 conversion inside pandas is exact
    frame = pd.DataFrame({"p": p, "q": q, "pq": p * q, "traded": (q != 0).astype(float)}, index=index)
    rolling = frame.rolling(f"{spec.size}ns") if spec.window == "time" else frame.rolling(spec.size, min_periods=1)
    last = {name: getattr(rolling, name)().iloc[-1] for name in ("count", "sum", "mean", "std", "var", "min", "max")}
    sums = rolling.sum().iloc[-1]
    n = int(last["count"]["p"])
    row = {name: float(value["p"]) for name, value in last.items()}
    row["first"], row["last"] = float(p[-n]), float(p[-1])
    if n > 1 and (p[-n:] == p[-1]).all():
        # pandas' online variance leaves rounding residue on a constant window (1.8e-12 at 1e5,
        # pandas 3.1): the exact value, which the engine gives, is 0.
        row["var"] = row["std"] = 0.0
    row["volume"] = float(sums["q"])
    row["vwap"] = float(sums["pq"] / sums["q"]) if sums["traded"] > 0 else math.nan
    std = row["std"]
    row["zscore"] = (row["last"] - row["mean"]) / std if std > 0 else math.nan
    return row


def pandas_ewma(spec: SignalSpec, t: np.ndarray, p: np.ndarray) -> float:
    times = pd.DatetimeIndex(t - t[0])
    return float(pd.Series(p).ewm(halflife=pd.Timedelta(spec.size, "ns"), times=times).mean().iloc[-1])


def exact_ewma(half_life: int, t: np.ndarray, p: np.ndarray) -> float:
    weights = [0.5 ** (int(t[-1] - ti) / half_life) for ti in t]
    return math.fsum(w * pi for w, pi in zip(weights, p, strict=True)) / math.fsum(weights)


@dataclass
class AcceptedTicks:
    """Independent bookkeeping of each key's accepted ticks (the late-tick rule, one tick at a time)."""

    ticks: dict[int, list[tuple[int, float, float]]] = field(default_factory=lambda: defaultdict(list))

    def feed(self, slots: np.ndarray, t: np.ndarray, p: np.ndarray, q: np.ndarray) -> tuple[set[int], int]:
        touched, late = set(), 0
        for key, ti, pi, qi in zip(slots.tolist(), t.tolist(), p.tolist(), q.tolist(), strict=True):
            history = self.ticks[key]
            if history and ti < history[-1][0]:
                late += 1
                continue
            history.append((ti, pi, qi))
            touched.add(key)
        return touched, late

    def evict(self, keys: list[int]) -> None:
        """Forget these keys: their index comes back as a brand-new key."""
        for key in keys:
            self.ticks.pop(key, None)

    def arrays(self, key: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t, p, q = zip(*self.ticks[key], strict=True)
        return np.array(t, np.int64), np.array(p), np.array(q)


def check_results(specs: list[SignalSpec], results: list[SignalResult], book: AcceptedTicks, touched: set[int]) -> None:
    for spec, result in zip(specs, results, strict=True):
        assert result.slots.tolist() == sorted(touched)
        for row, key in enumerate(result.slots.tolist()):
            t, p, q = book.arrays(key)
            assert result.t[row] == t[-1]
            if spec.window == "ewma":
                assert_close(result.stats["ewma"][row], pandas_ewma(spec, t, p), f"{spec.name} key {key} ewma")
                exact = exact_ewma(spec.size, t, p)
                scale = float(np.abs(p).max())  # a weighted mean that cancels to ~0 is held to the price scale
                assert math.isclose(result.stats["ewma"][row], exact, rel_tol=1e-12, abs_tol=1e-12 * scale), "ewma"
                continue
            expected = pandas_window_row(spec, t, p, q)
            for stat in spec.stats:
                got, what = float(result.stats[stat][row]), f"{spec.name} key {key} {stat}"
                if not agrees(got, expected[stat]):
                    assert_exact(got, stat, *window_of(spec, t, p, q), what=f"{what} (pandas said {expected[stat]!r})")


@st.composite
def tick_streams(draw: st.DrawFn) -> Stream:
    """Several keys; equal times, gaps and late ticks; grid prices; volumes with zeros; batch cuts."""
    n = draw(st.integers(1, 80))
    slots = np.array(draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), np.int64)
    steps = draw(st.lists(st.sampled_from([0, 0, 1, 2, 3, 7, 40, -2, -9]), min_size=n, max_size=n))
    t = 1_700_000_000_000_000_000 + np.cumsum(np.array(steps, np.int64))
    base = draw(st.sampled_from([0.0, 100.0, 1e5]))
    p = base + np.array(draw(st.lists(st.integers(-40, 40), min_size=n, max_size=n))) * 0.25
    q = np.array(draw(st.lists(st.sampled_from([0.0, 0.0, 1.0, 2.5, 7.0]), min_size=n, max_size=n)))
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=6))))
    return slots, t, p, q, cuts


def eviction_plans(top: int, batches: int) -> st.SearchStrategy[list[list[int]]]:
    """Per batch, the key indices evicted after it: often none, some in use (later reused by a
    new key, whose ticks may be older than the evicted key's), repeats, ``top`` never used."""
    return st.lists(st.lists(st.integers(0, top), max_size=3), min_size=batches, max_size=batches)


def run_oracle(specs: list[SignalSpec], stream: Stream, path: str, evictions: list[list[int]]) -> None:
    slots, t, p, q, cuts = stream
    engine, book = Engine(specs, use_kernel=PATHS[path]), AcceptedTicks()
    for part, evicted in zip(np.split(np.arange(slots.size), cuts), evictions, strict=False):
        results, late = engine.process(slots[part], t[part], p[part], q[part])
        touched, expected_late = book.feed(slots[part], t[part], p[part], q[part])
        assert late == expected_late
        check_results(specs, results, book, touched)
        engine.evict(np.array(evicted, np.int64))
        book.evict(evicted)
        assert engine.n_keys == len(book.ticks)


ORACLE_SETTINGS = settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class TestOracle:
    @pytest.mark.parametrize("path", PATHS)
    @ORACLE_SETTINGS
    @given(stream=tick_streams(), width=st.sampled_from([1, 3, 10, 45, 200]), evictions=eviction_plans(5, 7))
    def test_time_window_matches_pandas(self, path: str, stream: tuple, width: int, evictions: list[list[int]]) -> None:
        """Every stat of a time window equals pandas rolling('Wns') at each key's newest tick."""
        run_oracle([SignalSpec("tw", "time", width, WINDOW_STATS)], stream, path, evictions)

    @pytest.mark.parametrize("path", PATHS)
    @ORACLE_SETTINGS
    @given(stream=tick_streams(), length=st.sampled_from([1, 2, 3, 7, 50]), evictions=eviction_plans(5, 7))
    def test_count_window_matches_pandas(
        self, path: str, stream: tuple, length: int, evictions: list[list[int]]
    ) -> None:
        """Every stat of a count window equals pandas rolling(N, min_periods=1)."""
        run_oracle([SignalSpec("cw", "count", length, WINDOW_STATS)], stream, path, evictions)

    @pytest.mark.parametrize("path", PATHS)
    @ORACLE_SETTINGS
    @given(stream=tick_streams(), half_life=st.sampled_from([1, 5, 33, 1000]), evictions=eviction_plans(5, 7))
    def test_ewma_matches_pandas_and_exact_sum(
        self, path: str, stream: tuple, half_life: int, evictions: list[list[int]]
    ) -> None:
        """EWMA equals pandas ewm(halflife, times) and an fsum over int64-gap weights (1e-12)."""
        run_oracle([SignalSpec("ew", "ewma", half_life, EWMA_STATS)], stream, path, evictions)

    @pytest.mark.parametrize("path", PATHS)
    @ORACLE_SETTINGS
    @given(stream=tick_streams(), evictions=eviction_plans(5, 7))
    def test_signals_together_with_stat_subsets(self, path: str, stream: tuple, evictions: list[list[int]]) -> None:
        """Several signals with partial stat lists run side by side on one engine."""
        specs = [
            SignalSpec("a", "time", 20, ("min", "zscore")),
            SignalSpec("b", "count", 4, ("vwap", "last")),
            SignalSpec("c", "ewma", 10, EWMA_STATS),
        ]
        run_oracle(specs, stream, path, evictions)


def assert_same_results(
    reference: list[SignalResult], other: list[SignalResult], where: str, p: np.ndarray, q: np.ndarray
) -> None:
    """Same keys and times; every stat equal within 1e-12 relative (undefined where undefined).

    Values that cancel to near zero (an EWMA or a sum around 0) are held to 1e-12 of the stat's
    scale in the stream (largest |price|, squared for var, times the tick count for sums).
    """
    price, ticks = max(float(np.abs(p).max()), 1e-300), p.size
    scale = {"var": price**2, "std": price, "zscore": 1.0, "sum": ticks * price, "volume": ticks * float(q.max())}
    for ref, got in zip(reference, other, strict=True):
        assert got.slots.tolist() == ref.slots.tolist(), where
        assert got.t.tolist() == ref.t.tolist(), where
        assert list(got.stats) == list(ref.stats), where
        for stat, values in ref.stats.items():
            atol = 1e-12 * scale.get(stat, price)
            np.testing.assert_allclose(got.stats[stat], values, rtol=1e-12, atol=atol, err_msg=f"{where} {stat}")


def assert_same_state(reference: Engine, other: Engine, where: str, price: float = 1.0) -> None:
    """Identical integer state and live ticks; running sums within 1e-12 of each other.

    An EWMA numerator that cancels to near zero is held to 1e-12 of ``price`` (the stream's
    largest |price|) times its weight sum, as in :func:`assert_same_results`.
    """
    np.testing.assert_array_equal(other._last_t, reference._last_t, err_msg=where)
    assert other.n_keys == reference.n_keys, where
    for ref, got in zip(reference._states, other._states, strict=True):
        if isinstance(ref, _EwmaState):
            assert isinstance(got, _EwmaState)
            np.testing.assert_array_equal(got.t_last, ref.t_last, err_msg=where)
            atol = 1e-12 * price * float(np.abs(ref.den).max(initial=0.0))
            np.testing.assert_allclose(got.num, ref.num, rtol=1e-12, atol=atol, err_msg=where)
            np.testing.assert_allclose(got.den, ref.den, rtol=1e-12, err_msg=where)
            continue
        assert isinstance(got, _RingWindowState)
        np.testing.assert_array_equal(got.ints, ref.ints, err_msg=where)
        np.testing.assert_allclose(got.floats, ref.floats, rtol=1e-12, atol=1e-9, err_msg=where)
        assert (got.pool.used, got.live) == (ref.pool.used, ref.live), where
        for key in (ref.ints[:, 1] > 0).nonzero()[0].tolist():
            off, cap, head, split, end = ref.ints[key, :5].tolist()
            live = off + (np.arange(head, end) & (cap - 1))
            front = off + (np.arange(head, min(split, end)) & (cap - 1))
            for name, column in ref.pool.columns.items():
                positions = front if name.startswith("front") else live
                np.testing.assert_array_equal(got.pool.columns[name][positions], column[positions], err_msg=where)


class TestKernel:
    def test_kernel_is_built(self) -> None:
        """The compiled kernel is importable (pip install -e . builds it)."""
        assert KERNEL is not None, "streamd/_kernel.c is not built: run `pip install -e .`"

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(stream=tick_streams(), paths=st.lists(st.booleans(), min_size=7, max_size=7), evictions=eviction_plans(5, 7))
    def test_kernel_matches_numpy_tick_for_tick(
        self, stream: tuple, paths: list[bool], evictions: list[list[int]]
    ) -> None:
        """Batches through the kernel, NumPy or both in turn, keys evicted in between and their
        indices reused: same results and same state after each batch and each eviction."""
        slots, t, p, q, cuts = stream
        specs = [
            *DEFAULT_SIGNALS,
            SignalSpec("tw", "time", 20, WINDOW_STATS),
            SignalSpec("cw", "count", 3, ("sum", "vwap", "volume", "first")),
            SignalSpec("small", "time", 2, ("min", "max")),
        ]
        reference = Engine(specs, use_kernel=False)
        mixed = Engine(specs)
        for number, part in enumerate(np.split(np.arange(slots.size), cuts)):
            mixed._use_kernel = paths[number]
            expected, expected_late = reference.process(slots[part], t[part], p[part], q[part])
            got, late = mixed.process(slots[part], t[part], p[part], q[part])
            where = f"batch {number} ({'kernel' if paths[number] else 'numpy'})"
            assert late == expected_late, where
            assert_same_results(expected, got, where, p, q)
            scale = float(np.abs(p).max())
            assert_same_state(reference, mixed, where, scale)
            reference.evict(np.array(evictions[number], np.int64))
            mixed.evict(np.array(evictions[number], np.int64))
            assert_same_state(reference, mixed, f"{where}, after evicting {evictions[number]}", scale)

    def test_pool_growth_inside_a_kernel_batch(self) -> None:
        """Rings that outgrow the pool mid-batch resume where they stopped and match NumPy."""
        rng = np.random.default_rng(5)
        spec = [SignalSpec("tw", "time", 10_000, ("count", "mean", "min", "first"))]
        reference, kernel = Engine(spec, use_kernel=False), Engine(spec)
        for start in range(0, 20_000, 997):
            slots = rng.integers(0, 300, 997)
            t = start + np.arange(997)
            p = rng.integers(0, 100, 997) * 0.5
            expected, _ = reference.process(slots, t, p, np.ones(997))
            got, _ = kernel.process(slots, t, p, np.ones(997))
            assert_same_results(expected, got, f"at {start}", p, np.ones(1))
            assert_same_state(reference, kernel, f"at {start}")


LEVELS = [1e-3, 0.1, 1.0, 100.0, 1e5, 1e9]
QUANTITIES = [0.1, 0.3, 1 / 3, 7.0, 1e6, 1e-3, 2.5]


@st.composite
def level_shift_streams(draw: st.DrawFn) -> Stream:
    """Non-dyadic prices in stretches: constant, or small moves around a level from 1e-3 to 1e9 of
    either sign, jumping between levels; quote-only stretches (q = 0); a few keys; batch cuts."""
    p: list[float] = []
    q: list[float] = []
    for _ in range(draw(st.integers(1, 5))):
        length = draw(st.integers(1, 40))
        level = draw(st.sampled_from(LEVELS)) * draw(st.sampled_from([1.0, 1.0, -1.0]))
        move = draw(st.sampled_from([0.0, 1e-2, 1e-6, 1e-11]))
        steps = draw(st.lists(st.integers(-40, 40), min_size=length, max_size=length))
        p += [level * (1.0 + move * 0.37 * k) for k in steps]
        quotes_only = draw(st.booleans())
        sizes = draw(st.lists(st.sampled_from([0.0, *QUANTITIES]), min_size=length, max_size=length))
        q += [0.0] * length if quotes_only else sizes
    n = len(p)
    slots = np.array(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)), np.int64)
    steps = draw(st.lists(st.sampled_from([0, 1, 1, 2, 5, 40, -2]), min_size=n, max_size=n))
    t = 1_700_000_000_000_000_000 + np.cumsum(np.array(steps, np.int64))
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=8))))
    return slots, t, np.array(p), np.array(q), cuts


def check_exact(spec: SignalSpec, result: SignalResult, book: AcceptedTicks, where: str) -> None:
    """Every stat of every touched key against the exact oracle, within the window contract (1e-9)."""
    for row, key in enumerate(result.slots.tolist()):
        t, p, q = book.arrays(key)
        start = np.searchsorted(t, t[-1] - spec.size, "right") if spec.window == "time" else max(0, p.size - spec.size)
        wp, wq = p[start:], q[start:]
        expected = exact_window_stats(wp.tolist(), wq.tolist())
        for stat in spec.stats:
            actual, exact = float(result.stats[stat][row]), expected[stat]
            what = f"{where} key {key} {stat} over {wp.size} ticks"
            if math.isnan(exact):
                assert math.isnan(actual), f"{what}: expected undefined, got {actual!r}"
                continue
            slack = exact_tolerance(stat, wp.tolist(), RTOL)
            assert math.isclose(actual, exact, rel_tol=RTOL, abs_tol=slack), f"{what}: {actual!r} != {exact!r}"
        if "volume" in spec.stats:
            assert result.stats["volume"][row] >= 0.0, f"{where} key {key}: negative volume"


class TestExactness:
    @pytest.mark.parametrize("path", PATHS)
    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        stream=level_shift_streams(),
        window=st.sampled_from([("time", 1), ("time", 5), ("time", 30), ("time", 200), ("count", 1), ("count", 2),
                                ("count", 5), ("count", 40)]),
        evictions=eviction_plans(3, 9),
    )  # fmt: skip
    def test_every_stat_matches_the_exact_oracle(
        self, path: str, stream: Stream, window: tuple[str, int], evictions: list[list[int]]
    ) -> None:
        """Level shifts, jumps across orders of magnitude, negative and tiny prices, quote-only and
        constant stretches, any batch split, keys evicted and reused: every stat within 1e-9 of
        the exact value."""
        slots, t, p, q, cuts = stream
        kind, size = window
        spec = SignalSpec("w", kind, size, WINDOW_STATS)  # type: ignore[arg-type]
        engine, book = Engine([spec], use_kernel=PATHS[path]), AcceptedTicks()
        for number, part in enumerate(np.split(np.arange(slots.size), cuts)):
            (result,), _ = engine.process(slots[part], t[part], p[part], q[part])
            book.feed(slots[part], t[part], p[part], q[part])
            check_exact(spec, result, book, f"batch {number}")
            engine.evict(np.array(evictions[number], np.int64))
            book.evict(evictions[number])

    @pytest.mark.parametrize("path", PATHS)
    @pytest.mark.parametrize("kind", ["time", "count"])
    def test_quotes_after_trades_have_zero_volume_and_no_vwap(self, path: str, kind: str) -> None:
        """Once every trade has left the window, volume is exactly 0 and vwap undefined."""
        spec = SignalSpec("w", kind, 10, ("volume", "vwap"))  # type: ignore[arg-type]
        engine = Engine([spec], use_kernel=PATHS[path])
        q = np.r_[np.full(15, 0.1), np.full(30, 1 / 3), np.zeros(12)]
        p = 100.0 + 0.01 * np.arange(q.size)
        for i in range(q.size):
            (result,), _ = engine.process(np.zeros(1, np.int64), np.array([i]), p[i : i + 1], q[i : i + 1])
        assert result.stats["volume"][0] == 0.0
        assert math.isnan(result.stats["vwap"][0])

    @pytest.mark.parametrize("path", PATHS)
    @pytest.mark.parametrize(("level", "shift", "tick"), [(1e9, 1e4, 0.01), (1e5, 100.0, 0.01), (1e9, 0.1 - 1e9, 1e-3)])
    def test_std_after_a_level_shift(self, path: str, level: float, shift: float, tick: float) -> None:
        """After a shift (1e9 -> 1e9 + 1e4, 1e5 -> 1e5 + 100, 1e9 -> 0.1) std stays within 1e-9."""
        spec = SignalSpec("w", "count", 50, ("mean", "std", "vwap"))
        engine = Engine([spec], use_kernel=PATHS[path])
        rng = np.random.default_rng(2)
        moves = rng.integers(-50, 50, 300) * tick
        p = np.r_[np.full(100, level), np.full(200, level + shift)] + moves
        q = rng.random(300)
        for start in range(0, 300, 7):
            stop = min(start + 7, 300)
            batch = slice(start, stop)
            (result,), _ = engine.process(np.zeros(stop - start, np.int64), np.arange(start, stop), p[batch], q[batch])
            window = slice(max(0, stop - 50), stop)
            expected = exact_window_stats(p[window].tolist(), q[window].tolist())
            for stat in spec.stats:
                assert_close(float(result.stats[stat][0]), expected[stat], f"{stat} after tick {stop}")


class TestWindowStart:
    @settings(max_examples=25, deadline=None)
    @given(
        seed=st.integers(0, 2**32 - 1),
        width=st.sampled_from([50, 1_000, 20_000]),
        batch=st.sampled_from([5, 60, 700, 5_000]),
    )
    def test_any_number_of_evicted_ticks_per_batch(self, seed: int, width: int, batch: int) -> None:
        """Keys evicting none, a few, hundreds or all of a long window per batch get the exact window."""
        rng = np.random.default_rng(seed)
        n = 5_000
        slots = rng.choice(4, n, p=[0.7, 0.2, 0.09, 0.01])
        t = np.cumsum(rng.choice([0, 1, 2, 3, 500], n, p=[0.3, 0.3, 0.2, 0.19, 0.01]))
        p = (rng.integers(-1000, 1000, n) * 0.5).astype(np.float64)
        engine = Engine([SignalSpec("tw", "time", width, ("count", "first", "min", "max", "mean"))])
        for start in range(0, n, batch):
            part = slice(start, start + batch)
            (result,), _ = engine.process(slots[part], t[part], p[part], np.ones(p[part].size))
            for row, key in enumerate(result.slots.tolist()):
                mine = slots[: start + batch] == key
                kt, kp = t[: start + batch][mine], p[: start + batch][mine]
                window = kp[np.searchsorted(kt, kt[-1] - width, "right") :]
                expected = {"count": window.size, "first": window[0], "min": window.min(), "max": window.max(),
                            "mean": math.fsum(window) / window.size}  # fmt: skip
                for stat, value in expected.items():
                    assert_close(float(result.stats[stat][row]), float(value), f"key {key} {stat} at {start}")


class TestLateTicks:
    def test_late_ticks_are_dropped_and_counted(self) -> None:
        """A tick older than its key's newest accepted tick is dropped; equal times are kept."""
        engine = Engine([SignalSpec("cw", "count", 10, ("count", "last"))])
        slots = np.array([0, 0, 1, 0, 0, 1], np.int64)
        t = np.array([10, 12, 5, 11, 12, 4], np.int64)
        p = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        (result,), late = engine.process(slots, t, p, np.ones(6))
        assert late == 2
        assert result.slots.tolist() == [0, 1]
        assert result.t.tolist() == [12, 5]
        assert result.stats["count"].tolist() == [3.0, 1.0]
        assert result.stats["last"].tolist() == [5.0, 3.0]

    def test_key_with_only_late_ticks_is_not_emitted(self) -> None:
        """Keys whose ticks in a batch were all late do not appear in the results."""
        engine = Engine([SignalSpec("tw", "time", 100, ("count",))])
        engine.process(np.array([0, 1]), np.array([50, 50]), np.ones(2), np.ones(2))
        (result,), late = engine.process(np.array([0, 1]), np.array([49, 51]), np.ones(2), np.ones(2))
        assert late == 1
        assert result.slots.tolist() == [1]

    def test_empty_batch(self) -> None:
        """An empty batch yields empty results for every signal and no late ticks."""
        engine = Engine(list(DEFAULT_SIGNALS))
        empty = np.zeros(0, np.int64)
        results, late = engine.process(empty, empty, np.zeros(0), np.zeros(0))
        assert late == 0
        assert [r.slots.size for r in results] == [0, 0, 0]
        assert set(results[0].stats) == set(DEFAULT_SIGNALS[0].stats)


class TestNumericalStability:
    def test_long_run_at_large_prices_does_not_drift(self) -> None:
        """After 2M ticks of a 1e5 random walk with 1e-4 steps, stats equal a direct recomputation."""
        rng = np.random.default_rng(7)
        n, keys = 2_000_000, 3
        slots = rng.integers(0, keys, n)
        t = np.cumsum(rng.integers(0, 3_000, n))
        p = 1e5 + np.cumsum(rng.choice([-1e-4, 1e-4], n))
        q = rng.integers(0, 50, n).astype(np.float64)
        specs = [SignalSpec("tw", "time", 50_000_000, WINDOW_STATS), SignalSpec("cw", "count", 5_000, WINDOW_STATS)]
        engine = Engine(specs)
        cuts = np.cumsum(rng.integers(1, 60_000, 200))
        results: list[SignalResult] = []
        for part in np.split(np.arange(n), cuts[cuts < n]):
            results, _ = engine.process(slots[part], t[part], p[part], q[part])
        for spec, result in zip(specs, results, strict=True):
            for row, key in enumerate(result.slots.tolist()):
                mine = slots == key
                kt, kp, kq = t[mine], p[mine], q[mine]
                by_time = spec.window == "time"
                start = np.searchsorted(kt, kt[-1] - spec.size, "right") if by_time else kp.size - spec.size
                wp, wq = kp[start:], kq[start:]
                moves = wp - wp[-1]  # exact; keeps the reference itself free of cancellation
                mean_move, std = math.fsum(moves) / wp.size, moves.std(ddof=1)
                expected = {
                    "count": wp.size, "sum": math.fsum(wp), "mean": wp[-1] + mean_move, "std": std,
                    "var": moves.var(ddof=1), "min": wp.min(), "max": wp.max(), "first": wp[0], "last": wp[-1],
                    "volume": wq.sum(), "vwap": wp[-1] + math.fsum(moves * wq) / wq.sum(), "zscore": -mean_move / std,
                }  # fmt: skip
                for stat, value in expected.items():
                    assert_close(float(result.stats[stat][row]), float(value), f"{spec.name} key {key} {stat}")
                frame = pd.Series(kp, index=pd.DatetimeIndex(kt - kt[0]))
                window = frame.rolling(f"{spec.size}ns") if spec.window == "time" else frame.rolling(spec.size)
                assert_close(float(result.stats["mean"][row]), float(window.mean().iloc[-1]), "pandas mean")

    def test_variance_of_constant_prices_is_exactly_zero(self) -> None:
        """A window of identical large prices has var 0, std 0 and an undefined z-score."""
        engine = Engine([SignalSpec("cw", "count", 3, ("var", "std", "zscore"))])
        prices = np.array([5.0, 1e5 + 0.1, 1e5 + 0.1, 1e5 + 0.1])
        engine.process(np.zeros(4, np.int64), np.arange(4), prices, np.ones(4))
        (result,), _ = engine.process(np.zeros(1, np.int64), np.array([9]), np.array([1e5 + 0.1]), np.ones(1))
        assert result.stats["var"][0] == 0.0
        assert result.stats["std"][0] == 0.0
        assert math.isnan(result.stats["zscore"][0])


class TestReconfigure:
    def test_unchanged_signals_keep_state_and_new_ones_start_empty(self) -> None:
        """Reconfigure keeps same-window signals (even with new stats); new signals start empty."""
        rng = np.random.default_rng(3)
        n = 400
        slots = rng.integers(0, 3, n)
        t = np.cumsum(rng.integers(0, 5, n))
        p = 100 + rng.integers(-20, 20, n) * 0.5
        q = rng.integers(0, 4, n).astype(np.float64)
        kept = SignalSpec("kept", "time", 30, ("mean",))
        dropped = SignalSpec("gone", "count", 5, ("sum",))
        engine, book = Engine([kept, dropped]), AcceptedTicks()
        engine.process(slots[:200], t[:200], p[:200], q[:200])
        book.feed(slots[:200], t[:200], p[:200], q[:200])
        kept_more = SignalSpec("kept", "time", 30, WINDOW_STATS)
        fresh = SignalSpec("fresh", "count", 4, ("count", "mean"))
        engine.reconfigure([kept_more, fresh])
        results, _ = engine.process(slots[200:], t[200:], p[200:], q[200:])
        touched, _ = book.feed(slots[200:], t[200:], p[200:], q[200:])
        check_results([kept_more], results[:1], book, touched)
        fresh_book = AcceptedTicks()
        fresh_book.feed(slots[200:], t[200:], p[200:], q[200:])
        check_results([fresh], results[1:], fresh_book, touched)

    def test_resized_window_starts_empty(self) -> None:
        """A signal whose window size changes is rebuilt from scratch."""
        engine = Engine([SignalSpec("s", "count", 10, ("count",))])
        engine.process(np.zeros(5, np.int64), np.arange(5), np.ones(5), np.ones(5))
        engine.reconfigure([SignalSpec("s", "count", 20, ("count",))])
        (result,), _ = engine.process(np.zeros(1, np.int64), np.array([9]), np.ones(1), np.ones(1))
        assert result.stats["count"].tolist() == [1.0]


class TestStorage:
    def test_memory_per_key_and_signal_is_bounded(self) -> None:
        """100k keys with 3 ticks each hold under 2 KiB per key per signal."""
        keys, engine = 100_000, Engine(list(DEFAULT_SIGNALS))
        for tick in range(3):
            slots = np.random.default_rng(tick).permutation(keys)
            engine.process(slots, np.full(keys, tick * 1000), np.full(keys, 100.0 + tick), np.ones(keys))
        assert engine.n_keys == keys
        assert engine.memory_bytes() / (keys * len(DEFAULT_SIGNALS)) < 2048

    def test_windows_survive_growth_shrink_and_compaction(self) -> None:
        """Rings that grow, empty out and get compacted keep returning correct windows and free memory."""
        spec = SignalSpec("tw", "time", 1_000, ("count", "sum", "min", "max", "first"))
        engine, book = Engine([spec]), AcceptedTicks()
        rng = np.random.default_rng(11)
        now, peak = 0, 0
        for burst in range(14):
            size = 15_000 if burst < 3 else int(rng.integers(1, 300))
            slots = rng.integers(0, 100, size)
            t = now + np.sort(rng.integers(0, 900, size))
            p = rng.integers(0, 1000, size).astype(np.float64)
            results, _ = engine.process(slots, t, p, np.ones(size))
            touched, _ = book.feed(slots, t, p, np.ones(size))
            check_results([spec], results, book, touched)
            peak = max(peak, engine.memory_bytes())
            now += 5_000 if burst % 3 == 2 else 300
        assert engine.memory_bytes() < peak / 4


class TestEviction:
    @pytest.mark.parametrize("path", PATHS)
    def test_a_reused_index_is_a_brand_new_key(self, path: str) -> None:
        """After eviction an index takes ticks older than its old key's (not late) and gives,
        bit for bit, what a fresh engine gives for the new key's ticks alone."""
        specs = [
            *DEFAULT_SIGNALS,
            SignalSpec("tw", "time", 50, WINDOW_STATS),
            SignalSpec("cw", "count", 4, WINDOW_STATS),
        ]
        rng = np.random.default_rng(8)
        used, fresh = Engine(specs, use_kernel=PATHS[path]), Engine(specs, use_kernel=PATHS[path])
        used.process(rng.integers(0, 3, 300), np.arange(1_000, 1_300), 1e5 + rng.random(300), rng.random(300))
        used.evict(np.array([1]))
        assert used.n_keys == 2
        for start in range(0, 60, 12):
            t, p, q = np.arange(start, start + 12), 3.0 + rng.random(12), rng.integers(0, 3, 12).astype(float)
            got, late = used.process(np.ones(12, np.int64), t, p, q)
            expected, _ = fresh.process(np.zeros(12, np.int64), t, p, q)
            assert late == 0
            for mine, theirs in zip(got, expected, strict=True):
                assert mine.slots.tolist() == [1]
                assert mine.t.tolist() == theirs.t.tolist()
                for stat, values in theirs.stats.items():
                    np.testing.assert_array_equal(mine.stats[stat], values, err_msg=f"{stat} at {start}")

    def test_unused_repeated_or_already_evicted_indices_are_harmless(self) -> None:
        """Evicting indices never used, beyond every table, repeated or evicted before changes nothing else."""
        engine = Engine(list(DEFAULT_SIGNALS))
        engine.process(np.arange(3), np.full(3, 10), np.ones(3), np.ones(3))
        before = engine.memory_bytes()
        engine.evict(np.array([7, 7, 10**9]))
        engine.evict(np.zeros(0, np.int64))
        assert (engine.n_keys, engine.memory_bytes()) == (3, before)
        engine.evict(np.array([2, 2]))
        engine.evict(np.array([2]))
        assert engine.n_keys == 2
        (result, *_), _ = engine.process(np.arange(3), np.full(3, 5), np.ones(3), np.ones(3))
        assert result.slots.tolist() == [2]
        with pytest.raises(ValueError, match="negative"):
            engine.evict(np.array([-1]))

    @pytest.mark.parametrize("path", PATHS)
    def test_new_keys_on_evicted_indices_reuse_their_ring_blocks(self, path: str) -> None:
        """A flood of one-tick keys, each evicted a round later and its index given to a new key:
        after the first rounds the pool is neither grown nor compacted: its columns stay the same arrays."""
        engine = Engine(list(DEFAULT_SIGNALS), use_kernel=PATHS[path])
        n, now = 5_000, 0
        layouts: list[list[tuple[int, np.ndarray, bytes]]] = []
        for round_number in range(12):
            half = np.arange(n) + (round_number % 2) * n
            if round_number >= 2:
                engine.evict(half)
            now += 1_000_000
            engine.process(half, np.full(n, now), np.full(n, 100.0), np.ones(n))
            rings = [s for s in engine._states if isinstance(s, _RingWindowState)]
            layouts.append([(s.pool.used, s.pool.columns["p"], s.ints[: 2 * n, 0].tobytes()) for s in rings])
            assert engine.n_keys == min(2, round_number + 1) * n
        for layout in layouts[3:]:
            for (used, column, offsets), (used_then, column_then, offsets_then) in zip(layout, layouts[2], strict=True):
                assert (used, offsets) == (used_then, offsets_then)
                assert column is column_then

    @pytest.mark.parametrize("path", PATHS)
    def test_memory_stays_flat_under_key_churn(self, path: str) -> None:
        """Keys that tick, go silent and are evicted, their indices reused: memory stops growing,
        live ticks are exactly those of the held windows, and evicting everything frees the pool."""
        engine = Engine(list(DEFAULT_SIGNALS), use_kernel=PATHS[path])
        rng = np.random.default_rng(4)
        generation, now, memory = 1_000, 0, []
        held = np.zeros(0, np.int64)
        for round_number in range(40):
            # A new generation takes the indices freed by the one before last.
            free = np.setdiff1d(np.arange(2 * generation), held)[:generation]
            for _ in range(20):
                now += 100_000_000
                engine.process(
                    free, now + rng.integers(0, 1_000, generation), 100 + rng.random(generation), np.ones(generation)
                )
            if round_number:
                engine.evict(held[:generation])
            held = np.r_[held[generation:], free]
            assert engine.n_keys == held.size
            memory.append(engine.memory_bytes())
        assert max(memory[20:]) <= max(memory[5:10])
        for state in engine._states:
            if isinstance(state, _RingWindowState):
                bounds = state.ints[held]
                assert state.live == int((bounds[:, 4] - bounds[:, 2]).sum())
        engine.evict(held)
        assert engine.n_keys == 0
        assert all(
            state.pool.used == state.live == 0 for state in engine._states if isinstance(state, _RingWindowState)
        )
