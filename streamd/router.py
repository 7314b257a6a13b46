"""Where a tick is sharded: each key is routed to the worker that owns it and to a dense slot there.

The owning worker comes from :func:`streamd.sharding.shard_for`, computed once per key and cached.
Slots are dense per worker and assigned on first sight, so that only small integers travel to the
worker with each tick; the key itself travels once, announced in the first batch that carries it.

Per flush, the ingest passes :attr:`KeyRouter.codes` to :func:`streamd.protocol.decode_payloads`,
which looks every key up while it validates it, then hands the result to :meth:`KeyRouter.split`:
a known key is looked up once per tick, in the decoder, and never again.

A new key is *pending* until its worker is told about it: its ticks wait in the outbox's fresh
lane, and keys leave that lane only as fast as the worker has room (:meth:`KeyRouter.admit`).
So a flood of new keys cannot queue ahead of the keys the worker already computes, and every
later tick of a pending key joins it in the fresh lane, behind its earlier ones.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import compress, pairwise, repeat
from typing import NamedTuple

import numpy as np

from streamd.protocol import DecodedTicks, Float64Array, Int64Array
from streamd.sharding import shards_for

_FREE = np.iinfo(np.int64).max  # last_seen of a code no key holds: never silent
# Up to this many workers, one boolean mask per worker beats a stable sort by worker.
_MAX_WORKERS_BY_MASK = 4


Columns = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # slots, t, p, q


@dataclass
class Outbox:
    """Ticks buffered for one worker, in two lanes.

    The known lane holds ticks of keys the worker knows, or learns from ``new_keys`` in the
    next batch; the fresh lane holds ticks of pending keys (announced in ``fresh_keys``, in
    first-seen order), which leave when :meth:`KeyRouter.admit` lets their keys go. Each fresh
    part carries the lowest first-seen rank of its keys, so that admitting the oldest keys
    looks only at the parts that hold their ticks, not at the whole lane.
    """

    parts: list[Columns] = field(default_factory=list)
    ticks: int = 0
    oldest_ns: int = 0  # wall clock when the oldest buffered tick was received
    new_keys: list[tuple[int, str | int]] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)  # slots released since the last batch (after its ticks)
    fresh_parts: list[Columns] = field(default_factory=list)
    fresh_floors: list[int] = field(default_factory=list)  # per fresh part: the lowest rank of its keys
    fresh_ticks: int = 0
    fresh_oldest_ns: int = 0
    fresh_due_ns: int = 0  # when the fresh lane lets keys go even to a busy worker (set by the ingest)
    fresh_keys: deque[tuple[int, str | int]] = field(default_factory=deque)  # oldest first, taken from the left

    def add(self, columns: Columns, recv_ns: int) -> None:
        self.oldest_ns = self.oldest_ns if self.ticks else recv_ns
        self.parts.append(columns)
        self.ticks += len(columns[1])

    def fresh_lane(self) -> Outbox:
        """A new outbox with this one's fresh lane alone: what stays once the known lane has left."""
        return Outbox(
            fresh_parts=self.fresh_parts,
            fresh_floors=self.fresh_floors,
            fresh_ticks=self.fresh_ticks,
            fresh_oldest_ns=self.fresh_oldest_ns,
            fresh_due_ns=self.fresh_due_ns,
            fresh_keys=self.fresh_keys,
        )

    def add_fresh(self, columns: Columns, recv_ns: int, floor: int) -> None:
        """Ticks of pending keys; ``floor``: the lowest first-seen rank among them (:meth:`KeyRouter.floor`)."""
        self.fresh_oldest_ns = self.fresh_oldest_ns if self.fresh_ticks else recv_ns
        self.fresh_parts.append(columns)
        self.fresh_floors.append(floor)
        self.fresh_ticks += len(columns[1])


class WorkerTicks(NamedTuple):
    """One worker's share of a flush, in arrival order: its slots, the tick columns, and which
    ticks belong to pending keys (None: none of them)."""

    slots: Int64Array
    t: Int64Array
    p: Float64Array
    q: Float64Array
    pending: np.ndarray | None = None


class KeyRouter:
    """Maps each key to (worker, slot): slots are dense per worker and assigned on first sight.

    ``codes`` maps every key routed so far (and not evicted) to ``slot * workers + worker``. It
    only ever holds keys that passed the key rule, so the decoder may take it as its ``known``
    keys. The dict object stays the same for the router's lifetime.

    Bounded state: with ``max_keys`` (0 = no limit) a key beyond the limit is not routed, its
    ticks are dropped (counted in :attr:`rejected_ticks`). :meth:`evict_silent` removes keys
    with no tick for a while; their slots are *released*: announced to their worker as gone
    (:attr:`Outbox.gone`), and only reusable once the batch carrying that announcement has left
    (:meth:`recycle`), so a worker never sees a slot reused before it unmapped the old key.
    """

    def __init__(self, workers: int, max_keys: int = 0) -> None:
        self.workers = workers
        self.max_keys = max_keys
        self.codes: dict[str | int, int] = {}
        self.next_slot = [0] * workers
        self.rejected_ticks = 0  # ticks of keys beyond max_keys (or refused new keys) in the last split/route
        self.accept_new = True  # False: new keys are refused like keys beyond max_keys (a full fresh lane)
        self.rejected_keys = 0
        self.epoch = 0  # the coarse clock of last_seen, set by the caller before each sweep
        self._free_slots: list[list[int]] = [[] for _ in range(workers)]
        self._releasing: list[dict[int, str | int]] = [{} for _ in range(workers)]
        self._last_seen = np.zeros(0, np.int64)  # per code: epoch of its newest tick
        self._pending = np.zeros(0, bool)  # per code: a new key its worker has not been told about
        self._rank = np.zeros(0, np.int64)  # per code: when its key was first seen, counted in keys
        self._next_rank = 0
        self._key_of = np.empty(0, dtype=object)  # per code: its key (None when free)
        self._sweep_from = 0  # the code where the next step of an eviction pass starts

    @property
    def live_keys(self) -> int:
        return len(self.codes)

    def route(self, keys: list[str | int], outboxes: list[Outbox]) -> Int64Array:
        """Codes ``slot * workers + worker`` per tick (-1: over max_keys); announces new keys in ``outboxes``."""
        codes = self._complete(np.full(len(keys), -1, dtype=np.int64), keys, outboxes)
        self._touch(codes[codes >= 0] if self.rejected_ticks else codes)
        return codes

    def split(self, decoded: DecodedTicks, outboxes: list[Outbox]) -> list[WorkerTicks]:
        """Each worker's ticks of a decoded flush, in arrival order; announces new keys in ``outboxes``.

        ``decoded`` must come from ``decode_payloads(payloads, router.codes)`` (or without
        ``known``). Ticks of keys beyond ``max_keys`` are left out and counted in
        :attr:`rejected_ticks`.
        """
        codes = self._complete(decoded.codes, decoded.keys, outboxes)
        t, p, q = decoded.t, decoded.p, decoded.q
        if self.rejected_ticks:
            kept = codes >= 0
            codes, t, p, q = codes[kept], t[kept], p[kept], q[kept]
        self._touch(codes)
        pending = any_of(self._pending[codes])
        if self.workers == 1:
            return [WorkerTicks(codes, t, p, q, pending)]
        workers = codes % self.workers
        slots = codes // self.workers
        return [
            WorkerTicks(slots[mine], t[mine], p[mine], q[mine], None if pending is None else any_of(pending[mine]))
            for mine in self._ticks_by_worker(workers)
        ]

    def admit(self, worker: int, outbox: Outbox, keys: int) -> Columns | None:
        """Let up to ``keys`` pending keys of ``worker`` go: their announcements move to ``new_keys``
        and their ticks (all of them, in order) are returned; the rest stay in the fresh lane."""
        waiting = outbox.fresh_keys
        admitted = [waiting.popleft() for _ in range(min(keys, len(waiting)))]
        if not admitted:
            return None
        outbox.new_keys.extend(admitted)
        codes = np.fromiter((slot for slot, _ in admitted), np.int64, len(admitted)) * self.workers + worker
        self._pending[codes] = False
        top = int(self._rank[codes[-1]])  # admitted keys are the oldest pending ones: no part below holds them
        leaving: list[Columns] = []
        parts, floors = outbox.fresh_parts, outbox.fresh_floors
        for i in [i for i, floor in enumerate(floors) if floor <= top]:
            part_codes = parts[i][0] * self.workers + worker
            still = self._pending[part_codes]
            leaving.append(select(parts[i], ~still))
            parts[i] = select(parts[i], still)
            floors[i] = int(self._rank[part_codes[still]].min()) if still.any() else _FREE
        outbox.fresh_parts = [part for part in parts if len(part[0])]
        outbox.fresh_floors = [floor for part, floor in zip(parts, floors, strict=True) if len(part[0])]
        outbox.fresh_ticks -= sum(len(part[0]) for part in leaving)
        return concatenated(leaving) if leaving else None

    def floor(self, worker: int, slots: Int64Array) -> int:
        """The lowest first-seen rank among pending keys of ``worker`` (for :meth:`Outbox.add_fresh`)."""
        return int(self._rank[slots * self.workers + worker].min())

    def announcement(self, worker: int) -> list[tuple[int, str | int]]:
        """Every ``(slot, key)`` of ``worker``: what its replacement must be told before any tick.

        Announcing all of them at once keeps the slots (and the ticks already buffered under
        them) valid across a worker restart; slots being released are included, as their gone
        announcement is still to come. It runs once per restart, over the whole cache.
        """
        workers = self.workers
        mapped = [(code // workers, key) for key, code in self.codes.items() if code % workers == worker]
        return mapped + list(self._releasing[worker].items())

    def evict_silent(
        self, older_than: int, outboxes: list[Outbox], now_ns: int, step: tuple[int, int] | None = None
    ) -> int:
        """Release keys whose newest tick is from an epoch before ``older_than``; return how many.

        Without ``step`` one call looks at every key. With ``step = (look, release)`` a call is one
        step of a pass: it looks at up to ``look`` codes from where the last step stopped and
        releases at most ``release`` keys, so that a pass that finds a flood's worth of silent keys
        never holds up the caller for long; :attr:`sweeping` says whether the pass has more to do.

        Each released slot is added to its worker's :attr:`Outbox.gone`; the caller sends it and
        then hands it back through :meth:`recycle`.
        """
        top = min(len(self._key_of), max(self.next_slot) * self.workers)  # codes ever handed out
        start = self._sweep_from
        end = top if step is None else min(top, start + step[0])
        silent = start + np.flatnonzero((self._last_seen[start:end] < older_than) & ~self._pending[start:end])
        if step is not None and len(silent) > step[1]:
            silent = silent[: step[1]]
            end = int(silent[-1]) + 1
        self._sweep_from = end if end < top else 0
        if not len(silent):
            return 0
        keys = self._key_of[silent].tolist()
        self._key_of[silent] = None
        self._last_seen[silent] = _FREE
        deque(map(self.codes.pop, keys), maxlen=0)
        workers = silent % self.workers
        slots = silent // self.workers
        for worker in range(self.workers):
            mine = np.flatnonzero(workers == worker).tolist()
            if not mine:
                continue
            outbox = outboxes[worker]
            if not outbox.ticks and not outbox.gone:
                outbox.oldest_ns = now_ns
            released = slots[mine].tolist()
            outbox.gone.extend(released)
            self._releasing[worker].update(zip(released, map(keys.__getitem__, mine), strict=True))
        return len(keys)

    @property
    def sweeping(self) -> bool:
        """A pass of :meth:`evict_silent` in steps has codes left to look at."""
        return self._sweep_from > 0

    def recycle(self, worker: int, slots: list[int]) -> None:
        """``slots`` were announced gone to ``worker`` (the batch has left): new keys may take them."""
        releasing = self._releasing[worker]
        deque(map(releasing.pop, slots), maxlen=0)
        self._free_slots[worker].extend(slots)

    def _touch(self, codes: Int64Array) -> None:
        self._last_seen[codes] = self.epoch

    def _complete(self, codes: Int64Array, keys: list[str | int], outboxes: list[Outbox]) -> Int64Array:
        """``codes`` with the -1 of keys not routed before replaced by new codes (-1 stays: over max_keys)."""
        self.rejected_ticks = 0
        missing = np.flatnonzero(codes < 0)
        if not len(missing):
            return codes
        keys = list(map(keys.__getitem__, missing.tolist()))
        found = np.fromiter(map(self.codes.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))
        unseen = found < 0
        if unseen.any():
            fresh = self._assign(list(dict.fromkeys(compress(keys, unseen.tolist()))), outboxes)
            new = compress(keys, unseen.tolist())
            found[unseen] = np.array(list(map(fresh.get, new, repeat(-1))), np.int64)
            self.rejected_ticks = int(np.count_nonzero(found < 0))
        codes = codes.copy()
        codes[missing] = found
        return codes

    def _assign(self, fresh: list[str | int], outboxes: list[Outbox]) -> dict[str | int, int]:
        """Give each new key (distinct, first-seen order) a slot in its worker, as far as max_keys allows.

        Returns the codes of the keys it took (a small dict, cheaper to look up than all codes).
        """
        self.rejected_keys = 0
        if not self.accept_new or self.max_keys:
            room = max(0, self.max_keys - len(self.codes)) if self.accept_new else 0
            self.rejected_keys = max(0, len(fresh) - room)
            fresh = fresh[:room]
        if not fresh:
            return {}
        workers = shards_for(fresh, self.workers)
        codes = np.empty(len(fresh), np.int64)
        for worker in range(self.workers):
            mine = np.flatnonzero(workers == worker) if self.workers > 1 else np.arange(len(fresh))
            if not len(mine):
                continue
            slots = self._take_slots(worker, len(mine))
            codes[mine] = slots * self.workers + worker
            outboxes[worker].fresh_keys.extend(zip(slots.tolist(), map(fresh.__getitem__, mine.tolist()), strict=True))
        taken = dict(zip(fresh, codes.tolist(), strict=True))
        self.codes.update(taken)
        self._remember(codes, fresh)
        return taken

    def _take_slots(self, worker: int, count: int) -> Int64Array:
        """``count`` slots of ``worker``: recycled ones first, then new ones past the highest."""
        free = self._free_slots[worker]
        reused = free[len(free) - min(count, len(free)) :]
        del free[len(free) - len(reused) :]
        start = self.next_slot[worker]
        self.next_slot[worker] = start + count - len(reused)
        return np.concatenate([np.asarray(reused, np.int64), np.arange(start, self.next_slot[worker], dtype=np.int64)])

    def _remember(self, codes: Int64Array, keys: list[str | int]) -> None:
        """Per-code key and last-seen tables, grown by doubling to cover ``codes``."""
        top = int(codes.max()) + 1
        if top > len(self._key_of):
            size = max(top, 2 * len(self._key_of), 1024)
            key_of = np.empty(size, dtype=object)
            key_of[: len(self._key_of)] = self._key_of
            last_seen = np.full(size, _FREE, np.int64)
            last_seen[: len(self._last_seen)] = self._last_seen
            pending = np.zeros(size, bool)
            pending[: len(self._pending)] = self._pending
            rank = np.zeros(size, np.int64)
            rank[: len(self._rank)] = self._rank
            self._key_of, self._last_seen, self._pending, self._rank = key_of, last_seen, pending, rank
        self._key_of[codes] = keys
        self._last_seen[codes] = self.epoch
        self._pending[codes] = True
        self._rank[codes] = np.arange(self._next_rank, self._next_rank + len(codes))
        self._next_rank += len(codes)

    def _ticks_by_worker(self, workers: Int64Array) -> list[Int64Array]:
        """Per worker, the indices of its ticks in arrival order."""
        if self.workers <= _MAX_WORKERS_BY_MASK:
            return [np.flatnonzero(workers == worker) for worker in range(self.workers)]
        order = np.argsort(workers.astype(np.uint16), kind="stable")
        bounds = np.searchsorted(workers[order], np.arange(self.workers + 1)).tolist()
        return [order[start:end] for start, end in pairwise(bounds)]


def concatenated(parts: list[Columns]) -> Columns:
    """The parts' columns joined in order (no copy for a single part)."""
    if len(parts) == 1:
        return parts[0]
    slots, t, p, q = (np.concatenate(column) for column in zip(*parts, strict=True))
    return slots, t, p, q


def select(columns: Columns, mask: np.ndarray) -> Columns:
    slots, t, p, q = columns
    return slots[mask], t[mask], p[mask], q[mask]


def any_of(mask: np.ndarray) -> np.ndarray | None:
    """``mask``, or None when nothing in it is set (the common case, cheaper to test downstream)."""
    return mask if mask.any() else None
