"""Rolling-window engine: per-key time, count and EWMA windows over batches of ticks.

Pure maths, no I/O. The worker hands :meth:`Engine.process` a batch of ticks (many keys, arrival
order) and gets back, per signal, one row per touched key describing that key's window at its
newest accepted tick. Every step is vectorised over the batch; Python loops only run over signals,
segment size classes and the iterations of a vectorised search.

Design, per time/count signal:

* Ticks live in one flat pool of columns. Each key owns a power-of-two ring (``off``, ``cap``) and
  addresses it with absolute sequence numbers ``head <= split <= end``; the window is
  ``[head, end)``. Growing a ring or compacting the pool copies only live ticks (amortised O(1)).
* Sums (n, x, x^2, q, x q with ``x = p - centre``) are running per key: new ticks are added and
  evicted ticks subtracted with per-key ``np.add.reduceat``. The per-key centre (the newest price at
  the last *flip*) keeps large prices with tiny moves from cancelling catastrophically.
* Min/max use the two-stack trick: ticks in ``[head, split)`` (the *front*) carry suffix min/max
  computed at the flip; ticks in ``[split, end)`` (the *back*) are summarised per key. When ``head``
  passes ``split`` the key flips: its whole window becomes the new front, and its sums are
  recomputed exactly from the ring with a fresh centre, so running-sum drift never outlives about
  two windows. Each tick takes part in at most one flip.
* The time-window start is found by a vectorised galloping search from the old head, so the cost
  depends on the number of evicted ticks, not on the window length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
from numpy.typing import NDArray

from streamd.config import EWMA_STATS, WINDOW_STATS, SignalSpec

I64 = NDArray[np.int64]
F64 = NDArray[np.float64]

_I64_MIN = np.iinfo(np.int64).min

# Running sums over x = p - centre that each stat needs, and the pool columns they imply.
_SUM_NAMES = ("sx", "sxx", "sq", "sxq")
_STAT_NEEDS: dict[str, tuple[str, ...]] = {
    "count": (),
    "sum": ("sx",),
    "mean": ("sx",),
    "std": ("sx", "sxx"),
    "var": ("sx", "sxx"),
    "zscore": ("sx", "sxx"),
    "min": ("extremes",),
    "max": ("extremes",),
    "first": (),
    "last": (),
    "volume": ("sq",),
    "vwap": ("sq", "sxq"),
}


class SignalResult(NamedTuple):
    """One signal's rows for the keys touched by a batch (NaN marks an undefined stat)."""

    slots: I64
    t: I64
    stats: dict[str, F64]


class _Batch(NamedTuple):
    """Accepted ticks of one batch, grouped by key (ascending), arrival order within a key."""

    keys: I64
    starts: I64
    counts: I64
    within: I64  # index of each tick inside its key group
    t: I64
    p: F64
    q: F64
    t_last: I64  # newest accepted time per key


def _next_pow2(values: I64) -> I64:
    """Smallest power of two >= each value (values >= 1)."""
    exponent = np.ceil(np.log2(np.maximum(values, 1).astype(np.float64))).astype(np.int64)
    return np.left_shift(np.int64(1), exponent)


def _expand(lengths: I64) -> tuple[I64, I64]:
    """Index expansion of segments: (segment id, position inside the segment) for every element."""
    total = int(lengths.sum())
    segment = np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)
    starts = np.cumsum(lengths) - lengths
    return segment, np.arange(total, dtype=np.int64) - starts[segment]


def _suffix_extremes(values: F64, lengths: I64) -> tuple[F64, F64]:
    """Suffix min and max of each segment of ``values`` (concatenated segments, spare last slot).

    Segments are padded to the next power of two, one size class at a time, and scanned backwards
    as 2-D blocks; padding sits after each segment's data in scan order, so its value is irrelevant
    and it is written to the spare slot.
    """
    total = values.size - 1
    low, high = np.empty_like(values), np.empty_like(values)
    ends = np.cumsum(lengths)
    size_class = np.ceil(np.log2(lengths.astype(np.float64))).astype(np.int64)
    for cls in range(int(size_class.max()) + 1):
        chosen = np.flatnonzero(size_class == cls)
        if chosen.size == 0:
            continue
        if cls == 0:
            index = ends[chosen] - 1
            low[index] = high[index] = values[index]
            continue
        step = np.arange(1 << cls, dtype=np.int64)[:, None]
        index = np.where(step < lengths[chosen], ends[chosen] - 1 - step, total)
        block = values[index]
        low[index] = np.minimum.accumulate(block, axis=0)
        high[index] = np.maximum.accumulate(block, axis=0)
    return low[:total], high[:total]


def _sum_terms(names: Sequence[str], x: F64, q: F64) -> F64:
    """Per-tick terms of the running sums ``names``, one row each."""
    terms = np.empty((len(names), x.size))
    for row, name in enumerate(names):
        if name == "sx":
            terms[row] = x
        elif name == "sxx":
            np.multiply(x, x, out=terms[row])
        elif name == "sq":
            terms[row] = q
        else:
            np.multiply(x, q, out=terms[row])
    return terms


def _segment_sums(names: Sequence[str], p: F64, q: F64, centre: F64, lengths: I64) -> F64:
    """Per segment (all lengths >= 1), the sums ``names`` of its ticks centred on its ``centre``."""
    x = p - np.repeat(centre, lengths)
    return np.add.reduceat(_sum_terms(names, x, q), np.cumsum(lengths) - lengths, axis=1)


def _grow(array: NDArray[Any], size: int, fill: object) -> NDArray[Any]:
    """Return ``array`` extended to at least ``size`` elements (geometric growth), new ones = fill."""
    if array.size >= size:
        return array
    bigger = np.full(max(size, array.size + array.size // 2, 16), fill, dtype=array.dtype)
    bigger[: array.size] = array
    return bigger


def _needs(spec: SignalSpec) -> set[str]:
    return {need for stat in spec.stats for need in _STAT_NEEDS[stat]}


class _TickPool:
    """Flat column storage shared by all rings of one signal; blocks are bump-allocated."""

    def __init__(self, columns: dict[str, np.dtype]) -> None:
        self.columns: dict[str, NDArray[Any]] = {name: np.zeros(0, dtype) for name, dtype in columns.items()}
        self.used = 0

    @property
    def size(self) -> int:
        return next(iter(self.columns.values())).size

    def allocate(self, caps: I64) -> I64:
        """Reserve one block per cap; return the offsets."""
        offsets = self.used + np.cumsum(caps) - caps
        self.used += int(caps.sum())
        if self.used > self.size:
            new_size = max(self.used, 2 * self.size, 64)
            for name, column in self.columns.items():
                bigger = np.empty(new_size, column.dtype)
                bigger[: column.size] = column
                self.columns[name] = bigger
        return offsets

    def add_column(self, name: str, dtype: np.dtype) -> None:
        self.columns[name] = np.zeros(self.size, dtype)

    def nbytes(self) -> int:
        return sum(column.nbytes for column in self.columns.values())


class _RingWindowState:
    """Mutable state of one time or count signal for all keys."""

    _KEY_FIELDS: ClassVar[dict[str, tuple[type, object]]] = {
        "off": (np.int64, 0),
        "cap": (np.int64, 0),
        "head": (np.int64, 0),
        "split": (np.int64, 0),
        "end": (np.int64, 0),
        "centre": (np.float64, 0.0),
        "sum_sx": (np.float64, 0.0),
        "sum_sxx": (np.float64, 0.0),
        "sum_sq": (np.float64, 0.0),
        "sum_sxq": (np.float64, 0.0),
        "back_min": (np.float64, np.inf),
        "back_max": (np.float64, -np.inf),
    }

    def __init__(self, spec: SignalSpec) -> None:
        self.is_time = spec.window == "time"
        self.size = spec.size
        self.needs: set[str] = set()
        base: dict[str, np.dtype[Any]] = {"p": np.dtype(np.float64), "q": np.dtype(np.float64)}
        if self.is_time:
            base["t"] = np.dtype(np.int64)
        self.pool = _TickPool(base)
        self.live = 0  # ticks inside all windows, as of each key's latest update
        self.keys: dict[str, NDArray[Any]] = {name: np.zeros(0, dtype) for name, (dtype, _) in self._KEY_FIELDS.items()}
        self.require(spec)

    @property
    def sums(self) -> tuple[str, ...]:
        return tuple(name for name in _SUM_NAMES if name in self.needs)

    def require(self, spec: SignalSpec) -> None:
        """Make sure the state for ``spec.stats`` is kept; anything new forces every key to flip."""
        missing = _needs(spec) - self.needs
        if not missing:
            return
        self.needs |= missing
        if "extremes" in missing:
            self.pool.add_column("front_min", np.dtype(np.float64))
            self.pool.add_column("front_max", np.dtype(np.float64))
        self.keys["split"][:] = -1

    def nbytes(self) -> int:
        return self.pool.nbytes() + sum(array.nbytes for array in self.keys.values())

    def _ensure_keys(self, n: int) -> None:
        for name, (_, fill) in self._KEY_FIELDS.items():
            self.keys[name] = _grow(self.keys[name], n, fill)

    def update(self, batch: _Batch) -> dict[str, F64]:  # noqa: PLR0915 - one pass, kept in order
        """Append the batch, slide each touched key's window to its newest tick, return raw stats."""
        keys = batch.keys
        self._ensure_keys(int(keys[-1]) + 1)
        state = self.keys
        head, split, end = state["head"][keys], state["split"][keys], state["end"][keys]
        counts, starts, within = batch.counts, batch.starts, batch.within
        t, p, q = batch.t, batch.p, batch.q

        # Ticks of this batch that are already out of the window at the key's newest tick are
        # never stored; if any were, every older stored tick is out as well.
        if self.is_time:
            threshold = batch.t_last - self.size
            keep = t > np.repeat(threshold, counts)
        else:
            keep = within >= np.repeat(counts - self.size, counts)
        batch_evicted = np.zeros(keys.size, bool)
        if not keep.all():
            kept = np.add.reduceat(keep, starts, dtype=np.int64)
            batch_evicted = kept < counts
            counts = kept
            starts = np.cumsum(counts) - counts
            t, p, q = t[keep], p[keep], q[keep]
            within = np.arange(t.size, dtype=np.int64) - np.repeat(starts, counts)
        new_end = end + counts

        if self.is_time:
            new_head = head.copy()
            new_head[batch_evicted] = end[batch_evicted]
            search = np.flatnonzero(~batch_evicted & (end > head))
            if search.size:
                new_head[search] = self._first_after(keys[search], head[search], end[search], threshold[search])
        else:
            new_head = np.maximum(head, new_end - self.size)

        flip = new_head >= split
        steady = np.flatnonzero(~flip)
        if steady.size and self.sums:
            self._evict(keys[steady], head[steady], new_head[steady])

        cap = state["cap"][keys]
        grow = np.flatnonzero(new_end - new_head > cap)
        if grow.size:
            self._relocate(keys[grow], new_head[grow], end[grow], _next_pow2(new_end[grow] - new_head[grow]))
            cap = state["cap"][keys]
        off = state["off"][keys]
        mask = cap - 1

        columns = self.pool.columns
        position = np.repeat(off, counts) + ((np.repeat(end, counts) + within) & np.repeat(mask, counts))
        columns["p"][position] = p
        columns["q"][position] = q
        if self.is_time:
            columns["t"][position] = t

        if steady.size:
            self._append(keys[steady], starts[steady], counts[steady], p, q)
        flipping = np.flatnonzero(flip)
        if flipping.size:
            self._flip(keys[flipping], new_head[flipping], new_end[flipping], off[flipping], mask[flipping])

        self.live += int((new_end - new_head).sum() - (end - head).sum())
        state["head"][keys] = new_head
        state["end"][keys] = new_end
        stats = self._query(keys, new_head, new_end, off + (new_head & mask), p[starts + counts - 1])
        self._maybe_compact()
        return stats

    def _first_after(self, keys: I64, lo: I64, hi: I64, threshold: I64) -> I64:
        """Per key, the first sequence number in [lo, hi) whose time is > threshold (hi if none).

        Galloping then binary search: iterations grow with log(evicted ticks), not window length.
        """
        times = self.pool.columns["t"]
        off, mask = self.keys["off"][keys], self.keys["cap"][keys] - 1
        below = lo - 1  # last sequence number known to be <= threshold (virtual at start)
        above = hi.copy()  # first sequence number known to be > threshold, or hi
        step = np.ones(keys.size, np.int64)
        active = np.arange(keys.size)
        while active.size:
            probe = below[active] + step[active]
            beyond = probe >= hi[active]
            probe = np.minimum(probe, hi[active] - 1)
            later = times[off[active] + (probe & mask[active])] > threshold[active]
            stop = beyond | later
            above[active[later & ~beyond]] = probe[later & ~beyond]
            go_on = active[~stop]
            below[go_on] = probe[~stop]
            step[go_on] *= 2
            active = go_on
        active = np.flatnonzero(above - below > 1)
        while active.size:
            middle = (below[active] + above[active]) // 2
            later = times[off[active] + (middle & mask[active])] > threshold[active]
            above[active[later]] = middle[later]
            below[active[~later]] = middle[~later]
            active = active[above[active] - below[active] > 1]
        return above

    def _gather(self, keys: I64, lo: I64, hi: I64) -> tuple[I64, I64]:
        """Pool positions of sequence numbers [lo, hi) per key (all non-empty), and the lengths."""
        lengths = hi - lo
        segment, inside = _expand(lengths)
        off, mask = self.keys["off"][keys], self.keys["cap"][keys] - 1
        return off[segment] + ((lo[segment] + inside) & mask[segment]), lengths

    def _relocate(self, keys: I64, lo: I64, hi: I64, new_cap: I64) -> None:
        """Give ``keys`` fresh blocks of ``new_cap`` and copy their live ticks [lo, hi) over."""
        state = self.keys
        new_off = self.pool.allocate(new_cap)
        live = np.flatnonzero(hi > lo)
        if live.size:
            source, lengths = self._gather(keys[live], lo[live], hi[live])
            segment, inside = _expand(lengths)
            target = new_off[live][segment] + ((lo[live][segment] + inside) & (new_cap[live] - 1)[segment])
            for column in self.pool.columns.values():
                column[target] = column[source]
        state["off"][keys] = new_off
        state["cap"][keys] = new_cap

    def _evict(self, keys: I64, lo: I64, hi: I64) -> None:
        """Subtract ticks [lo, hi) leaving the window from the running sums of ``keys``."""
        leaving = np.flatnonzero(hi > lo)
        if leaving.size == 0:
            return
        keys = keys[leaving]
        position, lengths = self._gather(keys, lo[leaving], hi[leaving])
        columns, state = self.pool.columns, self.keys
        p, q, centre = columns["p"][position], columns["q"][position], state["centre"][keys]
        totals = _segment_sums(self.sums, p, q, centre, lengths)
        for row, name in enumerate(self.sums):
            state[f"sum_{name}"][keys] -= totals[row]

    def _append(self, keys: I64, starts: I64, counts: I64, p: F64, q: F64) -> None:
        """Fold the new ticks of keys whose front is still alive into their sums and back extremes."""
        state = self.keys
        segment, inside = _expand(counts)
        ticks = starts[segment] + inside
        tick_p = p[ticks]
        if self.sums:
            totals = _segment_sums(self.sums, tick_p, q[ticks], state["centre"][keys], counts)
            for row, name in enumerate(self.sums):
                state[f"sum_{name}"][keys] += totals[row]
        if "extremes" in self.needs:
            bounds = np.cumsum(counts) - counts
            state["back_min"][keys] = np.minimum(state["back_min"][keys], np.minimum.reduceat(tick_p, bounds))
            state["back_max"][keys] = np.maximum(state["back_max"][keys], np.maximum.reduceat(tick_p, bounds))

    def _flip(self, keys: I64, lo: I64, hi: I64, off: I64, mask: I64) -> None:
        """Rebuild ``keys`` from their whole window [lo, hi): fresh centre, exact sums, new front."""
        state, columns = self.keys, self.pool.columns
        lengths = hi - lo
        segment, inside = _expand(lengths)
        position = off[segment] + ((lo[segment] + inside) & mask[segment])
        tick_p = np.empty(position.size + 1)
        tick_p[:-1] = columns["p"][position]
        centre = tick_p[np.cumsum(lengths) - 1]
        if self.sums:
            totals = _segment_sums(self.sums, tick_p[:-1], columns["q"][position], centre, lengths)
            for row, name in enumerate(self.sums):
                state[f"sum_{name}"][keys] = totals[row]
        if "extremes" in self.needs:
            columns["front_min"][position], columns["front_max"][position] = _suffix_extremes(tick_p, lengths)
            state["back_min"][keys] = np.inf
            state["back_max"][keys] = -np.inf
        state["centre"][keys] = centre
        state["split"][keys] = hi

    def _query(self, keys: I64, head: I64, end: I64, head_position: I64, last: F64) -> dict[str, F64]:
        """Every stat this state can answer, for each key's window [head, end)."""
        state, columns = self.keys, self.pool.columns
        n = (end - head).astype(np.float64)
        centre = state["centre"][keys]
        out: dict[str, F64] = {
            "count": n,
            "first": columns["p"][head_position].astype(np.float64),
            "last": last,
        }
        total = {name: state[f"sum_{name}"][keys] for name in self.sums}
        with np.errstate(divide="ignore", invalid="ignore"):
            if "sx" in total:
                out["sum"] = n * centre + total["sx"]
                out["mean"] = centre + total["sx"] / n
            if "sxx" in total:
                var = np.maximum(total["sxx"] - total["sx"] * total["sx"] / n, 0.0) / (n - 1.0)
                var[n < 2] = np.nan
                std = np.sqrt(var)
                out["var"], out["std"] = var, std
                zscore = ((last - centre) - total["sx"] / n) / std
                zscore[~(std > 0)] = np.nan
                out["zscore"] = zscore
            if "sq" in total:
                out["volume"] = total["sq"]
            if "sxq" in total:
                vwap = centre + total["sxq"] / total["sq"]
                vwap[total["sq"] == 0] = np.nan
                out["vwap"] = vwap
        if "extremes" in self.needs:
            out["min"] = np.minimum(columns["front_min"][head_position], state["back_min"][keys]).astype(np.float64)
            out["max"] = np.maximum(columns["front_max"][head_position], state["back_max"][keys]).astype(np.float64)
        return out

    def _maybe_compact(self) -> None:
        """Re-lay every ring contiguously, sized to its window, once the pool is mostly waste.

        Waste (abandoned blocks and rings far larger than their window) only reaches 4x the live
        ticks after that many ticks were added or evicted since the last compaction: amortised O(1).
        """
        pool = self.pool
        if pool.used <= 4 * self.live + 4096:
            return
        state = self.keys
        keys = np.flatnonzero(state["cap"] > 0)
        lo, hi = state["head"][keys], state["end"][keys]
        source, lengths = self._gather(keys, lo, hi)
        new_cap = _next_pow2(lengths + lengths // 4 + 1)
        new_off = np.cumsum(new_cap) - new_cap
        segment, inside = _expand(lengths)
        target = new_off[segment] + ((lo[segment] + inside) & (new_cap - 1)[segment])
        used = int(new_cap.sum())
        for name, column in pool.columns.items():
            fresh = np.zeros(used + used // 4, column.dtype)
            fresh[target] = column[source]
            pool.columns[name] = fresh
        pool.used = used
        state["off"][keys] = new_off
        state["cap"][keys] = new_cap


class _EwmaState:
    """Mutable state of one EWMA signal: decayed weighted sums per key."""

    def __init__(self, spec: SignalSpec) -> None:
        self.half_life = float(spec.size)
        self.num = np.zeros(0, np.float64)
        self.den = np.zeros(0, np.float64)
        self.t_last = np.zeros(0, np.int64)

    def require(self, spec: SignalSpec) -> None:
        """EWMA state serves its single stat whatever the stats list says."""

    def nbytes(self) -> int:
        return self.num.nbytes + self.den.nbytes + self.t_last.nbytes

    def update(self, batch: _Batch) -> dict[str, F64]:
        """Decay each touched key's sums to its newest tick and add the batch's ticks."""
        keys, counts, starts = batch.keys, batch.counts, batch.starts
        size = int(keys[-1]) + 1
        self.num, self.den = _grow(self.num, size, 0.0), _grow(self.den, size, 0.0)
        self.t_last = _grow(self.t_last, size, 0)
        newest = batch.t_last
        # Differences of int64 nanoseconds are exact; only the gap is converted to float.
        weight = np.exp2(-(np.repeat(newest, counts) - batch.t).astype(np.float64) / self.half_life)
        weighted = np.add.reduceat(np.stack([weight * batch.p, weight]), starts, axis=1)
        den = self.den[keys]
        decay = np.exp2(-(newest - self.t_last[keys]).astype(np.float64) / self.half_life)
        decay[den == 0] = 0.0
        num = self.num[keys] * decay + weighted[0]
        den = den * decay + weighted[1]
        self.num[keys], self.den[keys], self.t_last[keys] = num, den, newest
        return {"ewma": num / den}


_State = _RingWindowState | _EwmaState


def _new_state(spec: SignalSpec) -> _State:
    allowed = EWMA_STATS if spec.window == "ewma" else WINDOW_STATS
    unknown = [stat for stat in spec.stats if stat not in allowed]
    if unknown:
        msg = f"signal {spec.name!r}: {', '.join(unknown)} not a {spec.window}-window stat"
        raise ValueError(msg)
    return _EwmaState(spec) if spec.window == "ewma" else _RingWindowState(spec)


def _running_max_before(t: I64, new_group: NDArray[np.bool_]) -> I64:
    """Per element, the max of the earlier elements of its group (int64 min for a group's first).

    Encodes (group, value) in one monotone int64 so that a single global maximum.accumulate stays
    within groups: the value rebased to the batch minimum when the span fits, its rank otherwise.
    """
    n = t.size
    group = np.cumsum(new_group) - 1
    low = int(t.min())
    span = int(t.max()) - low + 1
    if span * (int(group[-1]) + 1) < 2**62:
        encoded = group * span + (t - low)
        scale, decode = span, None
    else:
        decode = np.sort(t)
        rank = np.empty(n, np.int64)
        rank[np.argsort(t)] = np.arange(n)
        encoded, scale = group * n + rank, n
    running = np.maximum.accumulate(encoded)
    before = np.empty(n, np.int64)
    before[0] = -1
    before[1:] = running[:-1]
    inside = before - group * scale
    same = inside >= 0
    value = (inside + low) if decode is None else decode[np.where(same, inside, 0)]
    return np.where(same, value, _I64_MIN)


class Engine:
    """All signals of one worker: filters late ticks, then updates every signal per batch."""

    def __init__(self, specs: Sequence[SignalSpec]) -> None:
        self._specs: tuple[SignalSpec, ...] = ()
        self._states: list[_State] = []
        self._last_t = np.zeros(0, np.int64)
        self._seen = 0
        self.reconfigure(specs)

    def reconfigure(self, specs: Sequence[SignalSpec]) -> None:
        """Keep state of signals whose window is unchanged; new signals start empty; drop the rest."""
        old = {spec.name: (spec, state) for spec, state in zip(self._specs, self._states, strict=True)}
        states: list[_State] = []
        for spec in specs:
            previous = old.get(spec.name)
            if previous is not None and spec.same_window(previous[0]):
                state = previous[1]
                state.require(spec)
            else:
                state = _new_state(spec)
            states.append(state)
        self._specs, self._states = tuple(specs), states

    @property
    def n_keys(self) -> int:
        """Number of distinct keys that ever had an accepted tick."""
        return self._seen

    def memory_bytes(self) -> int:
        """Bytes held by all NumPy state."""
        return self._last_t.nbytes + sum(state.nbytes() for state in self._states)

    def process(self, slots: I64, t: I64, p: F64, q: F64) -> tuple[list[SignalResult], int]:
        """Apply one batch (arrival order); return one result per spec and the late-tick count."""
        slots = np.asarray(slots, np.int64)
        t, p, q = np.asarray(t, np.int64), np.asarray(p, np.float64), np.asarray(q, np.float64)
        if slots.size == 0:
            empty = np.zeros(0, np.int64)
            return [SignalResult(empty, empty, {s: np.zeros(0) for s in spec.stats}) for spec in self._specs], 0
        batch, late = self._accept(slots, t, p, q)
        if batch.keys.size == 0:
            empty = np.zeros(0, np.int64)
            return [SignalResult(empty, empty, {s: np.zeros(0) for s in spec.stats}) for spec in self._specs], late
        results = []
        for spec, state in zip(self._specs, self._states, strict=True):
            stats = state.update(batch)
            results.append(SignalResult(batch.keys, batch.t_last, {name: stats[name] for name in spec.stats}))
        return results, late

    def _accept(self, slots: I64, t: I64, p: F64, q: F64) -> tuple[_Batch, int]:
        """Group the batch by key and drop ticks older than the key's newest accepted tick."""
        n = slots.size
        if int(slots.max()) < np.iinfo(np.int64).max // n - 1:
            # Unique composite keys sort fast without a stable sort and keep arrival order.
            composite = np.sort(slots * n + np.arange(n))
            sorted_slots, order = np.divmod(composite, n)
        else:
            order = np.argsort(slots, kind="stable")
            sorted_slots = slots[order]
        sorted_t = t[order]
        size = int(sorted_slots[-1]) + 1
        if size > self._last_t.size:
            self._last_t = _grow(self._last_t, size, _I64_MIN)
        previous = self._last_t[sorted_slots]
        new_group = np.empty(n, bool)
        new_group[0] = True
        np.not_equal(sorted_slots[1:], sorted_slots[:-1], out=new_group[1:])
        if np.all((sorted_t[1:] >= sorted_t[:-1]) | new_group[1:]):
            accepted = sorted_t >= previous
        else:
            accepted = sorted_t >= np.maximum(previous, _running_max_before(sorted_t, new_group))
        if accepted.all():
            picked, keys_all, t_acc = order, sorted_slots, sorted_t
        else:
            picked, keys_all, t_acc = order[accepted], sorted_slots[accepted], sorted_t[accepted]
        late = n - picked.size
        if picked.size == 0:
            none = np.zeros(0, np.int64)
            return _Batch(none, none, none, none, none, np.zeros(0), np.zeros(0), none), late
        group_start = np.empty(picked.size, bool)
        group_start[0] = True
        np.not_equal(keys_all[1:], keys_all[:-1], out=group_start[1:])
        starts = np.flatnonzero(group_start)
        counts = np.diff(starts, append=picked.size)
        keys = keys_all[starts]
        t_last = t_acc[starts + counts - 1]
        fresh = self._last_t[keys] == _I64_MIN
        self._seen += int(fresh.sum())
        self._last_t[keys] = t_last
        within = np.arange(picked.size, dtype=np.int64) - np.repeat(starts, counts)
        return _Batch(keys, starts, counts, within, t_acc, p[picked], q[picked], t_last), late
