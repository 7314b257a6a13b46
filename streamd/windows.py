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
* Exactness (the window contract): count, first, last, min and max are exact; sum, mean, var,
  std, vwap, volume and zscore are within 1e-9 relative of the exact value of the float inputs,
  whatever the level (1e-3 to 1e9, either sign) and after any jump between levels. Where the
  exact value is near zero the slack is 1e-11 of the window's magnitude (sum |p|, mean |p| for
  mean and vwap) and 1e-9 for zscore. Three mechanisms, chosen on measurements (issue 9):
  an exact count of ticks with q != 0 (volume exactly 0 and no vwap without trades); a trailing
  run of equal prices (a constant window has var exactly 0, no zscore, its price as mean and
  vwap); and per running sum a bound on the rounding it has accumulated since the key was last
  rebuilt (terms added and evicted, their magnitudes, the sum itself). A key whose bound
  exceeds 1e-10 of what its stats need is rebuilt like a flip: exact sums around its newest
  price. Level shifts and large ticks leaving the window trip this at once; a steady stream
  trips it about once per 1e6 * window / (cancellation ratio) ticks, so the amortised cost per
  tick stays O(1): on the benchmark stream (1M ticks, 10k keys) no key needed it at all, while
  flips rebuilt 1.6M ticks. Compensated sums alone were not enough: they do not undo the
  rounding of ``p - centre`` against a stale centre, which is what the level-shift cases lose.
* The time-window start is found by comparing the first few ticks of every key at once, then, for
  keys evicting more, one round of galloping probes and a few rounds of 16-way probes, so the cost
  depends on the number of evicted ticks, not on the window length.
* Per-batch cost of the NumPy path is dominated by the number of NumPy calls, not by the ticks:
  per-key state is two tables read and written once per batch, sums and extremes are only kept for
  requested stats, and common cases (one tick per key, nothing evicted, no flip) skip whole steps.
* Keys come and go: the worker evicts a silent key (:meth:`Engine.evict`) and hands its index to a
  new key. Eviction resets the index's rows to those of a never-seen key and takes its ticks out
  of ``live``; compaction then reclaims the abandoned blocks, so memory follows the keys held,
  not the keys ever seen (``python -m bench.churn``: flat over 2M keys, ~26k held).

Compiled kernel. ``streamd/_kernel.c`` runs the same algorithm key by key and tick by tick on the
same state, and serves every batch when it is built. The NumPy path still makes ~100 NumPy calls
per signal per batch: ~120 µs for a 1-tick batch and ~300 µs for 50 ticks with the built-in
signals, against 16-50 µs through the kernel, which is also 1.4-2x faster at 1k-100k ticks
(``python -m bench.batch_cost``). It is plain C compiled at install time (setup.py): numba, the
usual choice, compiles with LLVM at run time, which needs writable-then-executable memory that
the systemd unit's ``MemoryDenyWriteExecute=yes`` forbids, and it adds a JIT cache and a start-up
cost to every replaced worker; the kernel adds ~0.2 ms of import. The NumPy path is kept as the
reference (tests check the kernel against it batch by batch) and as the fallback when no C
compiler was available at install time.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from streamd.config import EWMA_STATS, WINDOW_STATS, SignalSpec
from streamd.growable import GrowableArray

I64 = NDArray[np.int64]
F64 = NDArray[np.float64]

_I64_MIN = np.iinfo(np.int64).min


def _load_kernel() -> ModuleType | None:
    """The compiled kernel (streamd/_kernel.c, built by setup.py), or None if it was not built."""
    try:
        return importlib.import_module("streamd._kernel")
    except ImportError:
        return None


KERNEL = _load_kernel()
_NO_COLUMN = np.zeros(0)

# Running sums that each stat needs (over x = p - centre; ``sa`` sums |p|, the window's magnitude,
# ``sn`` counts ticks with q != 0, exactly), and the pool columns they imply.
_SUM_NAMES = ("sx", "sxx", "sq", "sxq", "sa", "sn")
_STAT_NEEDS: dict[str, tuple[str, ...]] = {
    "count": (),
    "sum": ("sx", "sa"),
    "mean": ("sx", "sa"),
    "std": ("sx", "sxx", "sa"),
    "var": ("sx", "sxx", "sa"),
    "zscore": ("sx", "sxx", "sa"),
    "min": ("extremes",),
    "max": ("extremes",),
    "first": (),
    "last": (),
    "volume": ("sq", "sn"),
    "vwap": ("sq", "sxq", "sn", "sa"),
}
# Unit roundoff of float64, and the drift a running sum may accumulate, relative to what its
# stats need, before its key is rebuilt from the ring (the contract is 1e-9; module docstring).
_ROUNDOFF = 2.0**-53
_DRIFT = 1e-10
# Sums near zero (a window straddling zero) are held to a fraction of the window's magnitude.
_MAGNITUDE_SHARE = 1e-2


class SignalResult(NamedTuple):
    """One signal's rows for the keys touched by a batch (NaN marks an undefined stat)."""

    slots: I64
    t: I64
    stats: dict[str, F64]


# Bump when what :meth:`Engine.export_state` writes changes shape or meaning: a checkpoint of
# another layout is never loaded (its signals start empty, with a log line).
STATE_LAYOUT = 1


class SignalState(NamedTuple):
    """One signal's state detached from the engine (copies): what a checkpoint holds.

    ``needs`` are the sums and extremes the state keeps (a superset of what ``spec`` needs
    after a reload added stats); ``arrays`` are its tables, per key row or per pooled tick.
    """

    spec: SignalSpec
    needs: tuple[str, ...]
    arrays: dict[str, NDArray[Any]]


class EngineState(NamedTuple):
    """Every signal's state plus each key's newest accepted time, rows indexed by local key."""

    last_t: I64
    signals: tuple[SignalState, ...]


class _Batch(NamedTuple):
    """Accepted ticks of one batch, grouped by key (ascending), arrival order within a key."""

    keys: I64
    starts: I64
    counts: I64
    last: I64  # index of each key's newest tick
    tick_key: I64  # position in ``keys`` of each tick's key
    within: I64  # index of each tick inside its key group
    t: I64
    p: F64
    q: F64
    t_first: I64  # oldest accepted time per key
    t_last: I64  # newest accepted time per key
    single: bool  # every key has exactly one tick
    max_count: int
    new_keys: int = 0  # keys that held no state before this batch (never seen, or evicted)


class _GroupedTicks(NamedTuple):
    """What the kernel's ``accept`` hands every signal: accepted ticks grouped by key, as :class:`_Batch`."""

    keys: I64
    starts: I64  # one more than keys: the last entry is the number of ticks
    t_last: I64
    t: I64
    p: F64
    q: F64
    new_keys: int = 0  # keys that held no state before this batch (never seen, or evicted)


def _batch(keys: I64, starts: I64, t: I64, p: F64, q: F64, t_last: I64) -> _Batch:
    """Group bookkeeping for ticks already sorted by key (``starts`` = first tick of each key)."""
    n, k = t.size, keys.size
    bounds = np.empty(k + 1, np.int64)
    bounds[:k] = starts
    bounds[k] = n
    counts = bounds[1:] - bounds[:-1]
    if n == k:
        tick_key, within = np.arange(k, dtype=np.int64), np.zeros(n, np.int64)
    else:
        tick_key = np.arange(k, dtype=np.int64).repeat(counts)
        within = np.arange(n, dtype=np.int64) - starts[tick_key]
    max_count = int(np.maximum.reduce(counts))
    return _Batch(keys, starts, counts, bounds[1:] - 1, tick_key, within, t, p, q, t[starts], t_last, n == k, max_count)


def _restrict(batch: _Batch, keep: NDArray[np.bool_]) -> _Batch:
    """The batch without the ticks not in ``keep`` (every key keeps at least its newest tick)."""
    kept = np.add.reduceat(keep, batch.starts, dtype=np.int64)
    starts = kept.cumsum() - kept
    return _batch(batch.keys, starts, batch.t[keep], batch.p[keep], batch.q[keep], batch.t_last)


def _next_pow2(values: I64) -> I64:
    """Smallest power of two >= each value (values >= 1)."""
    exponent = np.ceil(np.log2(np.maximum(values, 1).astype(np.float64))).astype(np.int64)
    return np.left_shift(np.int64(1), exponent)


def _ring_positions(off: I64, mask: I64, lo: I64, lengths: I64) -> tuple[I64, I64 | None, I64 | None]:
    """Pool positions of sequence numbers ``[lo, lo + length)`` of each ring (all lengths >= 1).

    Returns the positions ring after ring, each ring's first index among them and each position's
    ring; the last two are None when every length is 1 (positions then match rings one to one).
    """
    k = lengths.size
    total = int(np.add.reduce(lengths))
    if total == k:
        return off + (lo & mask), None, None
    ring = np.arange(k, dtype=np.int64).repeat(lengths)
    starts = lengths.cumsum() - lengths
    sequence = np.arange(total, dtype=np.int64) + (lo - starts)[ring]
    return off[ring] + (sequence & mask[ring]), starts, ring


def _suffix_extremes(values: F64, lengths: I64) -> tuple[F64, F64]:
    """Suffix min and max of each segment of ``values`` (concatenated segments, lengths >= 1).

    Segments are padded to the next power of two, one size class at a time (only the classes
    present), and scanned backwards as 2-D blocks; padding sits after each segment's data in scan
    order, so its value is irrelevant and it is written to a spare slot.
    """
    total = values.size
    padded = np.empty(total + 1)
    padded[:total] = values
    low, high = np.empty_like(padded), np.empty_like(padded)
    ends = lengths.cumsum()
    size_class = np.frexp((lengths - 1).astype(np.float64))[1]
    for cls in np.bincount(size_class).nonzero()[0].tolist():
        chosen = (size_class == cls).nonzero()[0]
        if cls == 0:
            index = ends[chosen] - 1
            low[index] = high[index] = padded[index]
            continue
        step = np.arange(1 << cls, dtype=np.int64)[:, None]
        index = np.where(step < lengths[chosen], ends[chosen] - 1 - step, total)
        block = padded[index]
        low[index] = np.minimum.accumulate(block, axis=0)
        high[index] = np.maximum.accumulate(block, axis=0)
    return low[:total], high[:total]


def _segment_sums(names: Sequence[str], p: F64, q: F64, centre: F64, starts: I64 | None) -> tuple[F64, F64]:
    """Per segment (rows), the sums ``names`` (columns) of its ticks centred on ``centre`` (per tick),
    and the sums of the terms' magnitudes (what bounds the rounding error of adding them up).

    ``starts`` None means one tick per segment. Terms are laid out one sum per row so that the
    segmented reduction runs along contiguous memory.
    """
    x = p - centre
    signed = [row for row, name in enumerate(names) if name in ("sx", "sxq")]
    terms = np.empty((len(names) + len(signed), x.size))
    for row, name in enumerate(names):
        if name == "sx":
            terms[row] = x
        elif name == "sxx":
            np.multiply(x, x, out=terms[row])
        elif name == "sq":
            terms[row] = q
        elif name == "sxq":
            np.multiply(x, q, out=terms[row])
        elif name == "sa":
            np.abs(p, out=terms[row])
        else:
            np.not_equal(q, 0.0, out=terms[row])
    for extra, row in enumerate(signed, len(names)):
        np.abs(terms[row], out=terms[extra])
    summed = (terms if starts is None else np.add.reduceat(terms, starts, axis=1)).T
    totals = summed[:, : len(names)]
    magnitudes = totals.copy()
    magnitudes[:, signed] = summed[:, len(names) :]
    return totals, magnitudes


def _trailing_runs(batch: _Batch, previous_last: F64, previous_run: I64) -> I64:
    """Per key, how many of its newest ticks have the newest price (continuing the previous run).

    A key's window holds only equal prices exactly when this run covers it.
    """
    p = batch.p
    if batch.single:
        return np.where(p == previous_last, previous_run + 1, 1)
    change = np.empty(p.size, bool)
    np.not_equal(p[1:], p[:-1], out=change[1:])
    change[batch.starts] = True
    last_change = np.maximum.reduceat(np.where(change, np.arange(p.size), 0), batch.starts)
    continued = (last_change == batch.starts) & (p[batch.starts] == previous_last)
    return np.where(continued, previous_run + batch.counts, batch.last + 1 - last_change)


def _rows(table: NDArray[Any]) -> NDArray[Any]:
    """A C-contiguous 2-D table seen as one opaque item per row (fast row scatter)."""
    return table.view(np.dtype((np.void, table.shape[1] * table.itemsize))).reshape(-1)


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
    """Flat column storage shared by all rings of one signal; blocks are bump-allocated.

    Each column lives in a :class:`GrowableArray`, and :attr:`columns` holds the only views of
    them, so a growing pool moves its pages instead of copying every tick.
    """

    def __init__(self, columns: dict[str, np.dtype]) -> None:
        self._arrays = {name: GrowableArray(dtype) for name, dtype in columns.items()}
        self.columns: dict[str, NDArray[Any]] = {name: array.view() for name, array in self._arrays.items()}
        self.used = 0

    @property
    def size(self) -> int:
        return next(iter(self.columns.values())).size

    def allocate(self, caps: I64) -> I64:
        """Reserve one block per cap; return the offsets."""
        offsets = self.used + caps.cumsum() - caps
        self.used += int(np.add.reduce(caps))
        self.reserve(self.used)
        return offsets

    def reserve(self, size: int) -> None:
        """Make every column hold at least ``size`` ticks (geometric growth)."""
        if size > self.size:
            new_size = max(size, 2 * self.size, 64)
            for name, array in self._arrays.items():
                self.columns[name] = _NO_COLUMN  # drop the view: the mapping can move
                self.columns[name] = array.resize(new_size)

    def add_column(self, name: str, dtype: np.dtype) -> None:
        self._arrays[name] = GrowableArray(dtype)
        self.columns[name] = self._arrays[name].resize(self.size)

    def relay(self, name: str, size: int, target: I64, source: I64) -> None:
        """Column ``name`` afresh with ``size`` ticks, tick ``source[i]`` now at ``target[i]``."""
        fresh = GrowableArray(self.columns[name].dtype)
        column = fresh.resize(size)
        column[target] = self.columns[name][source]
        self._arrays[name], self.columns[name] = fresh, column

    def nbytes(self) -> int:
        return sum(column.nbytes for column in self.columns.values())


# Columns of the per-key tables of a ring state: integers (ring, window bounds, trailing run of
# equal prices), then floats (centre, back extremes, newest price, the running sums in the order
# of ``_RingWindowState.sums`` and, as many columns on, each sum's drift bound).
_OFF, _CAP, _HEAD, _SPLIT, _END, _RUN = range(6)
_CENTRE, _BACK_MIN, _BACK_MAX, _LAST, _SUMS = range(5)
_DRIFTS = _SUMS + len(_SUM_NAMES)
_INT_FILL = np.zeros(6, np.int64)
_FLOAT_FILL = np.array([0.0, np.inf, -np.inf, np.nan] + [0.0] * 2 * len(_SUM_NAMES))
_INT_FILL_ROW, _FLOAT_FILL_ROW = _rows(_INT_FILL[None]), _rows(_FLOAT_FILL[None])
# Ticks of each key's window head compared at once before falling back to a galloping search.
_PROBE = np.arange(4, dtype=np.int64)
_SPREAD = np.arange(16, dtype=np.int64)
_MIN_CAP = 8


class _RingWindowState:
    """Mutable state of one time or count signal for all keys.

    Per key, one row of ``ints`` (ring offset and capacity, head, split, end) and one row of
    ``floats`` (centre, back extremes, running sums): a batch reads and writes each table once.
    """

    def __init__(self, spec: SignalSpec) -> None:
        self.is_time = spec.window == "time"
        self.size = spec.size
        self.needs: set[str] = set()
        self.sums: tuple[str, ...] = ()
        base: dict[str, np.dtype[Any]] = {"p": np.dtype(np.float64), "q": np.dtype(np.float64)}
        if self.is_time:
            base["t"] = np.dtype(np.int64)
        self.pool = _TickPool(base)
        self.live = 0  # ticks inside all windows, as of each key's latest update
        # Rows holding a key's ring: counted from each batch's keys new to the engine (a signal added
        # by a reload counts its keys only from the next compaction on, which counts them all).
        self.rings = 0
        self._int_rows = GrowableArray(np.int64, _INT_FILL.size)
        self._float_rows = GrowableArray(np.float64, _FLOAT_FILL.size)
        self.ints = self._int_rows.view()  # the only views of the row tables (see _cover)
        self.floats = self._float_rows.view()
        self.sum_kinds = np.zeros(0, np.int64)
        self.kernel_scalars = np.zeros(4, np.int64)  # pool used, pool size, live, size needed
        self.stat_codes: dict[tuple[str, ...], I64] = {}
        self.require(spec)

    def require(self, spec: SignalSpec) -> None:
        """Make sure the state for ``spec.stats`` is kept; anything new forces every key to flip.

        A flip recomputes every sum, so the sum columns can be laid out afresh.
        """
        missing = _needs(spec) - self.needs
        if not missing:
            return
        self.needs |= missing
        self.sums = tuple(name for name in _SUM_NAMES if name in self.needs)
        self.sum_kinds = np.array([_SUM_NAMES.index(name) for name in self.sums], np.int64)
        if "extremes" in missing:
            self.pool.add_column("front_min", np.dtype(np.float64))
            self.pool.add_column("front_max", np.dtype(np.float64))
        self.ints[:, _SPLIT] = -1

    def nbytes(self) -> int:
        return self.pool.nbytes() + self.ints.nbytes + self.floats.nbytes

    def evict(self, keys: I64) -> None:
        """Forget ``keys`` (distinct): their rows become those of a key never seen, empty rings aside.

        Each row keeps its ring block, empty: the worker gives a freed key index to the next new
        key, which then reuses the block instead of taking a new one at the end of the pool. Under
        key churn the pool then does not fill with abandoned blocks, and the compaction that would
        reclaim them (a pass over every live tick, tens of ms with a few hundred thousand keys)
        does not come due every few hundred thousand new keys. Evicted ticks leave ``live``, so a
        shrinking key population is still compacted (checked here too, so memory drops at once).
        """
        keys = keys[keys < self.ints.shape[0]]
        if keys.size == 0:
            return
        ints = self.ints
        end = ints[:, _END][keys]
        self.live -= int(np.add.reduce(end - ints[:, _HEAD][keys]))
        self.rings -= int(np.count_nonzero(end))
        off, cap = ints[:, _OFF][keys], ints[:, _CAP][keys]
        _rows(ints)[keys] = _INT_FILL_ROW
        ints[:, _OFF][keys], ints[:, _CAP][keys] = off, cap
        _rows(self.floats)[keys] = _FLOAT_FILL_ROW
        self._maybe_compact()

    def export(self) -> tuple[tuple[str, ...], dict[str, NDArray[Any]]]:
        """Copies of the per-key tables and of the used part of the pool (a memcpy each)."""
        used = self.pool.used
        arrays = {"ints": self.ints.copy(), "floats": self.floats.copy()}
        for name, column in self.pool.columns.items():
            arrays[f"pool.{name}"] = column[:used].copy()
        return tuple(sorted(self.needs)), arrays

    def adopt(
        self, spec: SignalSpec, needs: Sequence[str], parts: Sequence[tuple[dict[str, NDArray[Any]], I64]]
    ) -> None:
        """Become the concatenation of ``rows`` of each exported part (a fresh state only).

        Row ``rows[i]`` of a part becomes row ``offset + i``; a row beyond a part's tables is a
        never-seen key. Rings keep their sequence numbers and are re-laid contiguously, as by a
        compaction, so further batches give exactly what the exporting engines would have.
        """
        self.needs = set(needs)
        self.sums = tuple(name for name in _SUM_NAMES if name in self.needs)
        self.sum_kinds = np.array([_SUM_NAMES.index(name) for name in self.sums], np.int64)
        names = [name for name in parts[0][0] if name.startswith("pool.")]
        total = sum(rows.size for _, rows in parts)
        ints, floats = np.tile(_INT_FILL, (total, 1)), np.tile(_FLOAT_FILL, (total, 1))
        bases = np.cumsum([0] + [rows.size for _, rows in parts]).tolist()
        for (arrays, rows), base in zip(parts, bases, strict=False):
            if arrays["ints"].shape[1:] != _INT_FILL.shape or arrays["floats"].shape[1:] != _FLOAT_FILL.shape:
                msg = "per-key tables of another width"
                raise ValueError(msg)
            known = (rows < arrays["ints"].shape[0]).nonzero()[0]
            ints[base + known] = arrays["ints"][rows[known]]
            floats[base + known] = arrays["floats"][rows[known]]
        held = (ints[:, _CAP] > 0).nonzero()[0]
        lengths = ints[held, _END] - ints[held, _HEAD]
        new_cap = _next_pow2(lengths + lengths // 4 + 1)
        used = int(np.add.reduce(new_cap))
        self.pool = _TickPool({name[5:]: parts[0][0][name].dtype for name in names})
        self.pool.reserve(used + used // 4)
        self.pool.used, self.live = used, int(np.add.reduce(lengths))
        new_off = new_cap.cumsum() - new_cap
        for (arrays, _), lo_row, hi_row in zip(parts, bases[:-1], bases[1:], strict=True):
            mine = ((held >= lo_row) & (held < hi_row) & (lengths > 0)).nonzero()[0]
            if mine.size == 0:
                continue
            rows, lo, length = held[mine], ints[held[mine], _HEAD], lengths[mine]
            source, _, _ = _ring_positions(ints[rows, _OFF], ints[rows, _CAP] - 1, lo, length)
            target, _, _ = _ring_positions(new_off[mine], new_cap[mine] - 1, lo, length)
            for name in names:
                self.pool.columns[name[5:]][target] = arrays[name][source]
        ints[held, _OFF], ints[held, _CAP] = new_off, new_cap
        self._int_rows = GrowableArray(np.int64, _INT_FILL.size)
        self._float_rows = GrowableArray(np.float64, _FLOAT_FILL.size)
        self.ints, self.floats = self._int_rows.resize(total), self._float_rows.resize(total)
        self.ints[:], self.floats[:] = ints, floats
        self.rings = int(np.count_nonzero(ints[held, _END]))
        self.require(spec)

    def _cover(self, rows: int) -> None:
        """Per-key tables of at least ``rows`` rows; a row new to them is a never-seen key's.

        Only the new rows are written, so a growing key population touches its memory a batch
        at a time (:mod:`streamd.growable`).
        """
        known = self.ints.shape[0]
        if rows <= known:
            return
        del self.ints, self.floats  # their only views: the mappings can move
        self.ints = self._int_rows.resize(rows)  # new rows are zero, as _INT_FILL is
        self.floats = self._float_rows.resize(rows)
        self.floats[known:] = _FLOAT_FILL

    def update(self, batch: _Batch, wanted: Sequence[str]) -> dict[str, F64]:  # noqa: PLR0912, PLR0915 - one pass, kept in order
        """Append the batch, slide each touched key's window to its newest tick, return ``wanted``."""
        keys = batch.keys
        self._cover(int(keys[-1]) + 1)
        self.rings += batch.new_keys
        # Local copies, written back at the end (take and row views: 2-D fancy indexing is slow).
        ints, floats = self.ints.take(keys, axis=0), self.floats.take(keys, axis=0)
        off, cap, head, split, end = ints.T[:_RUN]  # views: relocation updates off and cap in place
        last = batch.p[batch.last]

        # Ticks of this batch that are already out of the window at the key's newest tick are
        # never stored; if any were, every older stored tick is out as well.
        if self.is_time:
            threshold = batch.t_last - self.size
            if not (batch.t_first > threshold).all():
                batch = _restrict(batch, batch.t > threshold[batch.tick_key])
        elif batch.max_count > self.size:
            batch = _restrict(batch, batch.within >= (batch.counts - self.size)[batch.tick_key])
        new_end = end + batch.counts
        mask = cap - 1
        if self.is_time:
            new_head = self._time_heads(off, mask, head, end, threshold)
        else:
            new_head = np.maximum(head, new_end - self.size)

        flip = new_head >= split
        any_flip = bool(flip.any())
        if self.sums:
            leaving = new_head > head
            if any_flip:
                leaving &= ~flip
            self._evict(floats, leaving.nonzero()[0], off, mask, head, new_head)

        grow = (new_end - new_head > cap).nonzero()[0]
        if grow.size:
            # Headroom of 2x-4x the window (at least _MIN_CAP ticks) so that growing windows
            # relocate rarely.
            new_cap = _next_pow2(np.maximum(2 * (new_end - new_head)[grow], _MIN_CAP))
            off[grow] = self._relocate(off[grow], mask[grow], new_head[grow], end[grow], new_cap)
            cap[grow] = new_cap
            mask = cap - 1

        columns = self.pool.columns
        if batch.single:
            position = off + (end & mask)
        else:
            tick_key = batch.tick_key
            position = off[tick_key] + ((end[tick_key] + batch.within) & mask[tick_key])
        columns["p"][position] = batch.p
        columns["q"][position] = batch.q
        if self.is_time:
            columns["t"][position] = batch.t

        # New ticks join the back of every key; flipping keys are then rebuilt from scratch.
        ints[:, _RUN] = _trailing_runs(batch, floats[:, _LAST], ints[:, _RUN])
        floats[:, _LAST] = last
        if self.sums:
            centre = floats[:, _CENTRE] if batch.single else floats[:, _CENTRE][batch.tick_key]
            starts = None if batch.single else batch.starts
            totals, magnitudes = _segment_sums(self.sums, batch.p, batch.q, centre, starts)
            self._accumulate(floats, slice(None), totals, magnitudes, batch.counts)
        if "extremes" in self.needs:
            if batch.single:
                low = high = batch.p
            else:
                low, high = np.minimum.reduceat(batch.p, batch.starts), np.maximum.reduceat(batch.p, batch.starts)
            np.minimum(floats[:, _BACK_MIN], low, out=floats[:, _BACK_MIN])
            np.maximum(floats[:, _BACK_MAX], high, out=floats[:, _BACK_MAX])
        if any_flip:
            flipping = flip.nonzero()[0]
            self._flip(floats, flipping, off[flipping], mask[flipping], new_head[flipping], new_end[flipping])
            split[flipping] = new_end[flipping]

        count = new_end - new_head
        drifted = self._drifted(floats, count, ints[:, _RUN])
        if drifted.size:
            self._flip(floats, drifted, off[drifted], mask[drifted], new_head[drifted], new_end[drifted])
            split[drifted] = new_end[drifted]

        self.live += int(np.add.reduce(count) - np.add.reduce(end - head))
        head[:] = new_head
        end[:] = new_end
        _rows(self.ints)[keys] = _rows(ints)
        _rows(self.floats)[keys] = _rows(floats)
        stats = self._query(wanted, floats, count, ints[:, _RUN], off + (new_head & mask), last)
        self._maybe_compact()
        return stats

    def update_compiled(self, grouped: _GroupedTicks, wanted: Sequence[str]) -> dict[str, F64]:
        """:meth:`update` done by the compiled kernel, one key and one tick at a time."""
        assert KERNEL is not None
        self._cover(int(grouped.keys[-1]) + 1)
        self.rings += grouped.new_keys
        codes = self.stat_codes.get(tuple(wanted))
        if codes is None:
            codes = self.stat_codes[tuple(wanted)] = np.array([WINDOW_STATS.index(s) for s in wanted], np.int64)
        out = np.empty((len(wanted), grouped.keys.size))
        pool, scalars = self.pool, self.kernel_scalars
        scalars[0], scalars[1], scalars[2] = pool.used, pool.size, self.live
        first = 0
        while first >= 0:
            columns = pool.columns
            first = KERNEL.ring_update(
                self.ints, self.floats, columns["p"], columns["q"], columns.get("t", _NO_COLUMN),
                columns.get("front_min", _NO_COLUMN), columns.get("front_max", _NO_COLUMN),
                grouped.keys, grouped.starts, grouped.t, grouped.p, grouped.q, self.sum_kinds, codes, out, scalars,
                self.is_time, self.size, "extremes" in self.needs, first,
            )  # fmt: skip
            if first >= 0:
                pool.reserve(int(scalars[3]))
                scalars[1] = pool.size
        pool.used, self.live = int(scalars[0]), int(scalars[2])
        self._maybe_compact()
        return {stat: out[row] for row, stat in enumerate(wanted)}

    def _time_heads(self, off: I64, mask: I64, head: I64, end: I64, threshold: I64) -> I64:
        """Per key, the first sequence number in [head, end) whose time is > threshold (end if none).

        The first few ticks of every key are compared at once (the usual case: a handful leave);
        keys that evict more are searched further by :meth:`_first_after`.
        """
        if self.live == 0:
            return head.copy()
        times = self.pool.columns["t"]
        length = end - head
        # Probes past the newest tick repeat it; an empty window reads some valid slot, ignored.
        probe = np.minimum(head[:, None] + _PROBE, (end - 1)[:, None])
        out = np.count_nonzero(times[off[:, None] + (probe & mask[:, None])] <= threshold[:, None], axis=1)
        new_head: I64 = head + np.minimum(out, length)
        far = ((out == _PROBE.size) & (length > _PROBE.size)).nonzero()[0]
        if far.size:
            new_head[far] = self._first_after(off[far], mask[far], new_head[far], end[far], threshold[far])
        return new_head

    def _first_after(self, off: I64, mask: I64, lo: I64, hi: I64, threshold: I64) -> I64:
        """Per ring, the first sequence number in [lo, hi) whose time is > threshold (hi if none; lo < hi).

        A round of galloping probes (lo + 2^j - 1) brackets each answer within about as many ticks
        as are evicted, then rounds of 16 evenly spread probes narrow the brackets 16-fold: the
        cost follows log(evicted ticks), not the window length.
        """
        times = self.pool.columns["t"]
        below, above = lo - 1, hi.copy()  # time at below <= threshold (lo - 1 virtually), at above >
        steps = (np.int64(1) << np.arange(int(np.maximum.reduce(hi - lo)).bit_length() + 1)) - 1
        probes = np.minimum(lo[:, None] + steps, (hi - 1)[:, None])
        active = np.arange(lo.size)
        while True:
            # Each row of probes is non-decreasing and inside (below, above).
            mask_a = mask[active][:, None]
            probe_times = times[off[active][:, None] + (probes & mask_a)]
            out = np.count_nonzero(probe_times <= threshold[active][:, None], axis=1)
            row, width = np.arange(active.size), probes.shape[1]
            new_below = np.where(out > 0, probes[row, out - 1], below[active])
            new_above = np.where(out < width, probes[row, np.minimum(out, width - 1)], above[active])
            below[active], above[active] = new_below, new_above
            still = new_above - new_below > 1
            active = active[still]
            if active.size == 0:
                return above
            base, gap = new_below[still] + 1, (new_above - new_below)[still] - 1
            probes = base[:, None] + (gap[:, None] * _SPREAD) // _SPREAD.size

    def _relocate(self, off: I64, mask: I64, lo: I64, hi: I64, new_cap: I64) -> I64:
        """Give rings fresh blocks of ``new_cap``, copy their live ticks [lo, hi); return the offsets."""
        new_off = self.pool.allocate(new_cap)
        live = (hi > lo).nonzero()[0]
        if live.size:
            lengths = (hi - lo)[live]
            source, _, _ = _ring_positions(off[live], mask[live], lo[live], lengths)
            target, _, _ = _ring_positions(new_off[live], new_cap[live] - 1, lo[live], lengths)
            for column in self.pool.columns.values():
                column[target] = column[source]
        return new_off

    def _evict(self, floats: F64, rows: I64, off: I64, mask: I64, lo: I64, hi: I64) -> None:
        """Subtract ticks [lo, hi) leaving the window of ``rows`` from their running sums."""
        if rows.size == 0:
            return
        lengths = (hi - lo)[rows]
        position, starts, ring = _ring_positions(off[rows], mask[rows], lo[rows], lengths)
        columns = self.pool.columns
        centre = floats[rows, _CENTRE] if ring is None else floats[rows, _CENTRE][ring]
        totals, magnitudes = _segment_sums(self.sums, columns["p"][position], columns["q"][position], centre, starts)
        self._accumulate(floats, rows, -totals, magnitudes, lengths)

    def _accumulate(self, floats: F64, rows: I64 | slice, totals: F64, magnitudes: F64, lengths: I64) -> None:
        """Add segment ``totals`` to the running sums of ``rows`` and grow their drift bounds.

        Summing ``m`` terms and adding the result to S rounds by at most
        ``u * ((m + 2) * sum|term| + |S|)`` (u the unit roundoff; +2 covers the rounding of the
        terms themselves), so that is what each bound grows by.
        """
        width = len(self.sums)
        sums = floats[rows, _SUMS : _SUMS + width] + totals
        floats[rows, _SUMS : _SUMS + width] = sums
        growth = (lengths + 2.0)[:, None] * magnitudes
        growth += np.abs(sums)
        floats[rows, _DRIFTS : _DRIFTS + width] += _ROUNDOFF * growth

    def _flip(self, floats: F64, rows: I64, off: I64, mask: I64, lo: I64, hi: I64) -> None:
        """Rebuild ``rows`` from their whole window [lo, hi): fresh centre, exact sums, new front."""
        columns = self.pool.columns
        lengths = hi - lo
        position, starts, ring = _ring_positions(off, mask, lo, lengths)
        tick_p = columns["p"][position]
        centre = tick_p if starts is None else tick_p[starts + lengths - 1]
        floats[rows, _CENTRE] = centre
        if self.sums:
            centre_per_tick = centre if ring is None else centre[ring]
            totals, _ = _segment_sums(self.sums, tick_p, columns["q"][position], centre_per_tick, starts)
            floats[rows, _SUMS : _SUMS + len(self.sums)] = totals
            floats[rows, _DRIFTS : _DRIFTS + len(self.sums)] = 0.0
        if "extremes" in self.needs:
            if starts is None:
                columns["front_min"][position] = columns["front_max"][position] = tick_p
            else:
                columns["front_min"][position], columns["front_max"][position] = _suffix_extremes(tick_p, lengths)
            floats[rows, _BACK_MIN] = np.inf
            floats[rows, _BACK_MAX] = -np.inf

    def _drifted(self, floats: F64, count: I64, run: I64) -> I64:
        """Rows whose running sums may have drifted more than ``_DRIFT`` from what their stats need.

        Each sum's bound is compared with the quantity its stats are computed from: the sum (or a
        share of the window's magnitude, for sums near zero), var * (n - 1) and n * std (z-score),
        the volume, and the vwap (or a share of the mean |price|). A key that takes in or evicts
        ticks far from its centre (a level shift, a jump across orders of magnitude), or whose
        large ticks left the window, fails this and is rebuilt exactly around its newest price.
        Constant windows and windows without trades skip the checks whose stats they do not use.
        """
        n = count.astype(np.float64)
        total = {name: floats[:, _SUMS + column] for column, name in enumerate(self.sums)}
        bound = {name: floats[:, _DRIFTS + column] for column, name in enumerate(self.sums)}
        varying = run < count
        bad = np.zeros(count.size, bool)
        with np.errstate(divide="ignore", invalid="ignore"):
            if "sx" in total:
                magnitude = _MAGNITUDE_SHARE * total["sa"]
                sums = np.abs(n * floats[:, _CENTRE] + total["sx"])
                bad |= ~(bound["sx"] <= _DRIFT * np.maximum(sums, magnitude)) | ~(bound["sa"] <= _DRIFT * total["sa"])
            if "sxx" in total:
                spread = total["sxx"] - total["sx"] * total["sx"] / n
                spread_bound = bound["sxx"] + 2.0 * np.abs(total["sx"]) * bound["sx"] / n
                n_std = n * np.sqrt(np.maximum(spread, 0.0) / (n - 1.0))
                bad |= (count > 1) & (~(spread_bound <= _DRIFT * spread) | ~(bound["sx"] <= _DRIFT * n_std))
            bad &= varying
            if "sq" in total:
                volume, traded = total["sq"], total["sn"] > 0
                bad |= traded & ~(bound["sq"] <= _DRIFT * volume)
            if "sxq" in total:
                vwap = floats[:, _CENTRE] + total["sxq"] / volume
                vwap_bound = (bound["sxq"] + np.abs(total["sxq"]) * bound["sq"] / volume) / volume
                typical = _MAGNITUDE_SHARE * total["sa"] / n
                bad |= traded & varying & ~(vwap_bound <= _DRIFT * np.maximum(np.abs(vwap), typical))
        return bad.nonzero()[0]

    def _query(
        self, wanted: Sequence[str], floats: F64, count: I64, run: I64, head_position: I64, last: F64
    ) -> dict[str, F64]:
        """The ``wanted`` stats of each key's window, given its rows, length, run, head and newest price.

        A window whose prices are all equal (its trailing run covers it) has exactly that price as
        mean and vwap, n times it as sum, variance 0 and no z-score; one without trades has
        volume 0 and no vwap.
        """
        columns = self.pool.columns
        n = count.astype(np.float64)
        centre = floats[:, _CENTRE]
        total = {name: floats[:, _SUMS + column] for column, name in enumerate(self.sums)}
        constant = run >= count
        out: dict[str, F64] = {}
        with np.errstate(divide="ignore", invalid="ignore"):
            for stat in wanted:
                if stat in out:
                    continue
                if stat == "count":
                    out[stat] = n
                elif stat == "first":
                    out[stat] = columns["p"][head_position]
                elif stat == "last":
                    out[stat] = last
                elif stat == "sum":
                    out[stat] = np.where(constant, n * last, n * centre + total["sx"])
                elif stat == "mean":
                    out[stat] = np.where(constant, last, centre + total["sx"] / n)
                elif stat in ("var", "std", "zscore"):
                    var = np.maximum(total["sxx"] - total["sx"] * total["sx"] / n, 0.0) / (n - 1.0)
                    var[constant] = 0.0
                    var[n < 2] = np.nan
                    std = np.sqrt(var)
                    zscore = ((last - centre) - total["sx"] / n) / std
                    zscore[~(std > 0)] = np.nan
                    out.update(var=var, std=std, zscore=zscore)
                elif stat == "volume":
                    out[stat] = np.where(total["sn"] > 0, total["sq"], 0.0)
                elif stat == "vwap":
                    vwap = np.where(constant, last, centre + total["sxq"] / total["sq"])
                    vwap[total["sn"] == 0] = np.nan
                    out[stat] = vwap
                elif stat == "min":
                    out[stat] = np.minimum(columns["front_min"][head_position], floats[:, _BACK_MIN])
                else:
                    out[stat] = np.maximum(columns["front_max"][head_position], floats[:, _BACK_MAX])
        return out

    def _maybe_compact(self) -> None:
        """Re-lay every ring contiguously, sized to its window, once the pool is mostly waste.

        Waste (abandoned blocks and rings far larger than their window) only reaches 4x the live
        ticks, plus a new ring's ``_MIN_CAP`` per ring, after that many ticks were added or evicted
        since the last compaction: amortised O(1). The allowance per ring keeps keys that hold a
        tick or two (a flood of new keys) from making every few hundred thousand keys a compaction.
        Rows evicted and not yet taken by a new key (no tick since: ``end`` 0) give up their blocks.
        """
        pool = self.pool
        if pool.used <= 4 * self.live + _MIN_CAP * self.rings + 4096:
            return
        ints = self.ints
        unused = ((ints[:, _CAP] > 0) & (ints[:, _END] == 0)).nonzero()[0]
        ints[unused, _OFF] = ints[unused, _CAP] = 0
        keys = (ints[:, _CAP] > 0).nonzero()[0]
        self.rings = len(keys)
        lo, hi = ints[keys, _HEAD], ints[keys, _END]
        lengths = hi - lo
        new_cap = _next_pow2(lengths + lengths // 4 + 1)
        new_off = new_cap.cumsum() - new_cap
        used = int(np.add.reduce(new_cap))
        live = (lengths > 0).nonzero()[0]
        source, _, _ = _ring_positions(ints[keys[live], _OFF], ints[keys[live], _CAP] - 1, lo[live], lengths[live])
        target, _, _ = _ring_positions(new_off[live], new_cap[live] - 1, lo[live], lengths[live])
        for name in list(pool.columns):
            pool.relay(name, used + used // 4, target, source)
        pool.used = used
        ints[keys, _OFF] = new_off
        ints[keys, _CAP] = new_cap


class _EwmaState:
    """Mutable state of one EWMA signal: decayed weighted sums per key."""

    def __init__(self, spec: SignalSpec) -> None:
        self.half_life = float(spec.size)
        self._hold(np.zeros(0), np.zeros(0), np.zeros(0, np.int64))

    def require(self, spec: SignalSpec) -> None:
        """EWMA state serves its single stat whatever the stats list says."""

    def nbytes(self) -> int:
        return self.num.nbytes + self.den.nbytes + self.t_last.nbytes

    def evict(self, keys: I64) -> None:
        """Forget ``keys`` (distinct): zero weight means the next tick starts afresh."""
        keys = keys[keys < self.num.size]
        self.num[keys] = self.den[keys] = 0.0
        self.t_last[keys] = 0

    def export(self) -> tuple[tuple[str, ...], dict[str, NDArray[Any]]]:
        return (), {"num": self.num.copy(), "den": self.den.copy(), "t_last": self.t_last.copy()}

    def adopt(
        self, spec: SignalSpec, needs: Sequence[str], parts: Sequence[tuple[dict[str, NDArray[Any]], I64]]
    ) -> None:
        """Become the concatenation of ``rows`` of each exported part (rows beyond a part: never seen)."""
        gathered = {}
        for name in ("num", "den", "t_last"):
            pieces = []
            for arrays, rows in parts:
                column = arrays[name]
                piece = np.zeros(rows.size, column.dtype)
                known = (rows < column.size).nonzero()[0]
                piece[known] = column[rows[known]]
                pieces.append(piece)
            gathered[name] = np.concatenate(pieces) if pieces else np.zeros(0)
        self._hold(gathered["num"], gathered["den"], gathered["t_last"])

    def _hold(self, num: NDArray[Any], den: NDArray[Any], t_last: NDArray[Any]) -> None:
        """Hold these per-key columns, each in a :class:`GrowableArray` of its own."""
        self._num, self._den, self._t_last = (
            GrowableArray(np.float64),
            GrowableArray(np.float64),
            GrowableArray(np.int64),
        )
        self.num, self.den = self._num.resize(num.size), self._den.resize(den.size)
        self.t_last = self._t_last.resize(t_last.size)
        self.num[:], self.den[:], self.t_last[:] = num, den, t_last

    def _cover(self, size: int) -> None:
        """Columns of at least ``size`` keys; new keys' entries are zero (no weight yet)."""
        if size <= self.num.size:
            return
        del self.num, self.den, self.t_last  # their only views: the mappings can move
        self.num, self.den, self.t_last = self._num.resize(size), self._den.resize(size), self._t_last.resize(size)

    def update(self, batch: _Batch, wanted: Sequence[str]) -> dict[str, F64]:
        """Decay each touched key's sums to its newest tick and add the batch's ticks."""
        keys, newest = batch.keys, batch.t_last
        self._cover(int(keys[-1]) + 1)
        # Differences of int64 nanoseconds are exact; only the gap is converted to float.
        weight = np.exp2((batch.t - newest[batch.tick_key]).astype(np.float64) / self.half_life)
        terms = np.empty((2, weight.size))
        np.multiply(weight, batch.p, out=terms[0])
        terms[1] = weight
        weighted = terms if batch.single else np.add.reduceat(terms, batch.starts, axis=1)
        den = self.den[keys]
        decay = np.exp2((self.t_last[keys] - newest).astype(np.float64) / self.half_life)
        decay[den == 0] = 0.0
        num = self.num[keys] * decay + weighted[0]
        den = den * decay + weighted[1]
        self.num[keys], self.den[keys], self.t_last[keys] = num, den, newest
        return {"ewma": num / den}

    def update_compiled(self, grouped: _GroupedTicks, wanted: Sequence[str]) -> dict[str, F64]:
        """:meth:`update` done by the compiled kernel."""
        assert KERNEL is not None
        self._cover(int(grouped.keys[-1]) + 1)
        out = np.empty(grouped.keys.size)
        KERNEL.ewma_update(self.num, self.den, self.t_last, grouped.keys, grouped.starts, grouped.t, grouped.p,
                           self.half_life, out)  # fmt: skip
        return {"ewma": out}


_State = _RingWindowState | _EwmaState


def _new_state(spec: SignalSpec) -> _State:
    allowed = EWMA_STATS if spec.window == "ewma" else WINDOW_STATS
    unknown = [stat for stat in spec.stats if stat not in allowed]
    if unknown:
        msg = f"signal {spec.name!r}: {', '.join(unknown)} not a {spec.window}-window stat"
        raise ValueError(msg)
    return _EwmaState(spec) if spec.window == "ewma" else _RingWindowState(spec)


def _restore_problem(spec: SignalSpec, found: Sequence[SignalState | None]) -> str | None:
    """Why exported states cannot restore ``spec`` (None when they can)."""
    if not found:
        return "nothing to restore"
    first = found[0]
    for state in found:
        if state is None:
            return "not in the checkpoint"
        if not spec.same_window(state.spec):
            return f"window changed (checkpoint: {state.spec.window} {state.spec.size}, now: {spec.window} {spec.size})"
        if first is not None and state.needs != first.needs:
            return "checkpoints of different stats"
    return None


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
    """All signals of one worker: filters late ticks, then updates every signal per batch.

    Batches go through the compiled kernel when it is built (:data:`KERNEL`), else through NumPy.
    Both paths work on the same state and can take turns; ``use_kernel=False`` keeps every batch
    on the NumPy path, the reference the kernel is tested against.

    Keys are the worker's local indices (small non-negative integers, tables grow to the largest
    seen). Per-key state lives until :meth:`evict`; the index can then serve another key.
    """

    def __init__(self, specs: Sequence[SignalSpec], use_kernel: bool = True) -> None:
        self._specs: tuple[SignalSpec, ...] = ()
        self._states: list[_State] = []
        self._last_t = np.zeros(0, np.int64)
        self._held = 0
        self._use_kernel = use_kernel and KERNEL is not None
        self._sort_space = np.zeros(0, np.int64)
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
        """Number of keys holding state: an accepted tick since the engine started or the key's eviction."""
        return self._held

    def evict(self, keys: I64) -> None:
        """Drop all state of these key indices, in every signal, so that they can serve new keys.

        An evicted index is exactly a never-seen one: its next tick is accepted whatever its time
        (never ``late``), and its windows hold only what comes after. Ring space it held goes to
        the next key given its index, or is reclaimed by compaction, so under key churn memory
        follows the keys held, not the keys ever seen. Indices never used, already evicted or
        beyond every table are ignored; a negative index is an error. Cost: about 20 NumPy calls
        in all, linear in the number of keys (no sort), plus now and then a compaction, paid for
        by the ticks it frees.
        """
        keys = np.asarray(keys, np.int64).ravel()
        if keys.size == 0:
            return
        if int(np.minimum.reduce(keys)) < 0:
            msg = f"evict: negative key index {int(np.minimum.reduce(keys))}"
            raise ValueError(msg)
        # An index beyond _last_t never had a tick, so no table holds anything for it.
        keys = keys[keys < self._last_t.size]
        keys, newest = self._distinct(keys)
        self._held -= int(np.count_nonzero(newest != _I64_MIN))
        self._last_t[keys] = _I64_MIN
        for state in self._states:
            state.evict(keys)

    def _distinct(self, keys: I64) -> tuple[I64, I64]:
        """``keys`` without repeats (in no particular order) and their newest accepted times.

        Each key's entry of ``_last_t`` (restored afterwards by the caller) briefly holds the
        position of one of its occurrences: one pass, no sort, no table of its own.
        """
        newest = self._last_t[keys]
        position = np.arange(keys.size, dtype=np.int64)
        self._last_t[keys] = position
        kept = self._last_t[keys] == position
        return keys[kept], newest[kept]

    def export_state(self) -> EngineState:
        """A copy of all state (memcpy of each table and of each pool's used part)."""
        signals = tuple(
            SignalState(spec, *state.export()) for spec, state in zip(self._specs, self._states, strict=True)
        )
        return EngineState(self._last_t.copy(), signals)

    def restore(self, parts: Sequence[tuple[EngineState, I64]]) -> dict[str, str]:
        """Replace all state by the given rows of exported states: ``rows[i]`` of the first part
        becomes key ``i``, the second part's rows follow, and so on (one part restores a worker,
        several re-shard the keys of several workers into one).

        A signal is restored when every part holds a signal of its name with the same window;
        otherwise it starts empty. Returns, per signal that starts empty, why. Further batches
        give exactly the results the exporting engines would have given (kernel or NumPy path).
        """
        total = sum(rows.size for _, rows in parts)
        last_t = np.full(total, _I64_MIN, np.int64)
        base = 0
        for state, rows in parts:
            known = (rows < state.last_t.size).nonzero()[0]
            last_t[base + known] = state.last_t[rows[known]]
            base += rows.size
        self._last_t, self._held = last_t, int(np.count_nonzero(last_t != _I64_MIN))
        empty: dict[str, str] = {}
        for index, spec in enumerate(self._specs):
            fresh = _new_state(spec)
            found = [next((s for s in state.signals if s.spec.name == spec.name), None) for state, _ in parts]
            problem = _restore_problem(spec, found)
            if problem is None:
                try:
                    needs = found[0].needs if found[0] is not None else ()
                    fresh.adopt(spec, needs, [(s.arrays, rows) for s, (_, rows) in zip(found, parts, strict=True) if s])
                except (ValueError, KeyError, IndexError) as exc:
                    problem = f"unreadable state ({exc})"
                    fresh = _new_state(spec)
            if problem is not None:
                empty[spec.name] = problem
            self._states[index] = fresh
        return empty

    def memory_bytes(self) -> int:
        """Bytes held by all NumPy state."""
        return self._last_t.nbytes + sum(state.nbytes() for state in self._states)

    def process(self, slots: I64, t: I64, p: F64, q: F64) -> tuple[list[SignalResult], int]:
        """Apply one batch (arrival order); return one result per spec and the late-tick count."""
        slots = np.ascontiguousarray(slots, np.int64)
        t, p, q = (
            np.ascontiguousarray(t, np.int64),
            np.ascontiguousarray(p, np.float64),
            np.ascontiguousarray(q, np.float64),
        )
        if self._use_kernel and slots.size:
            return self._process_compiled(slots, t, p, q)
        batch, late = self._accept(slots, t, p, q) if slots.size else (None, 0)
        if batch is None:
            empty = np.zeros(0, np.int64)
            return [SignalResult(empty, empty, {s: np.zeros(0) for s in spec.stats}) for spec in self._specs], late
        results = []
        for spec, state in zip(self._specs, self._states, strict=True):
            stats = state.update(batch, spec.stats)
            results.append(SignalResult(batch.keys, batch.t_last, {name: stats[name] for name in spec.stats}))
        return results, late

    def _process_compiled(self, slots: I64, t: I64, p: F64, q: F64) -> tuple[list[SignalResult], int]:
        """:meth:`process` through the compiled kernel: one C call to group, one per signal."""
        assert KERNEL is not None
        n = slots.size
        if self._sort_space.size < 2 * n:
            self._sort_space = np.empty(2 * n, np.int64)
        index = np.empty(3 * n + 1, np.int64)
        keys, starts, t_last = index[:n], index[n : 2 * n + 1], index[2 * n + 1 :]
        bt, bpq = np.empty(n, np.int64), np.empty(2 * n)
        while True:
            groups, kept, late, new_keys = KERNEL.accept(
                slots, t, p, q, self._last_t, self._sort_space, keys, starts, t_last, bt, bpq[:n], bpq[n:]
            )
            if groups >= 0:
                break
            self._last_t = _grow(self._last_t, kept, _I64_MIN)
        self._held += new_keys
        if groups == 0:
            empty = np.zeros(0, np.int64)
            return [SignalResult(empty, empty, {s: np.zeros(0) for s in spec.stats}) for spec in self._specs], late
        grouped = _GroupedTicks(keys[:groups], starts[: groups + 1], t_last[:groups], bt, bpq[:n], bpq[n:], new_keys)
        results = []
        for spec, state in zip(self._specs, self._states, strict=True):
            stats = state.update_compiled(grouped, spec.stats)
            results.append(SignalResult(grouped.keys, grouped.t_last, {name: stats[name] for name in spec.stats}))
        return results, late

    def _accept(self, slots: I64, t: I64, p: F64, q: F64) -> tuple[_Batch | None, int]:
        """Group the batch by key and drop ticks older than the key's newest accepted tick."""
        n = slots.size
        if int(np.maximum.reduce(slots)) < np.iinfo(np.int64).max // n - 1:
            # Unique composite keys sort fast without a stable sort and keep arrival order.
            composite = slots * n + np.arange(n)
            composite.sort()
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
        if ((sorted_t[1:] >= sorted_t[:-1]) | new_group[1:]).all():
            accepted = sorted_t >= previous
        else:
            accepted = sorted_t >= np.maximum(previous, _running_max_before(sorted_t, new_group))
        if accepted.all():
            picked, keys_all, t_acc, group_start = order, sorted_slots, sorted_t, new_group
        else:
            picked, keys_all, t_acc = order[accepted], sorted_slots[accepted], sorted_t[accepted]
            if picked.size == 0:
                return None, n
            group_start = np.empty(picked.size, bool)
            group_start[0] = True
            np.not_equal(keys_all[1:], keys_all[:-1], out=group_start[1:])
        starts = group_start.nonzero()[0]
        keys = keys_all[starts]
        batch = _batch(keys, starts, t_acc, p[picked], q[picked], np.empty(0, np.int64))
        t_last = t_acc[batch.last]
        new_keys = int(np.count_nonzero(self._last_t[keys] == _I64_MIN))
        self._held += new_keys
        self._last_t[keys] = t_last
        return batch._replace(t_last=t_last, new_keys=new_keys), n - picked.size
