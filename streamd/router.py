"""Where a tick is sharded: each key is routed to the worker that owns it and to a dense slot there.

The owning worker comes from :func:`streamd.sharding.shard_for`, computed once per key and cached.
Slots are dense per worker and assigned on first sight, so that only small integers travel to the
worker with each tick; the key itself travels once, announced in the first batch that carries it.

Per flush, the ingest passes :attr:`KeyRouter.codes` to :func:`streamd.protocol.decode_payloads`,
which looks every key up while it validates it, then hands the result to :meth:`KeyRouter.split`:
a known key is looked up once per tick, in the decoder, and never again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import compress, pairwise, repeat
from typing import NamedTuple

import numpy as np

from streamd.protocol import DecodedTicks, Float64Array, Int64Array
from streamd.sharding import shard_for

# Up to this many workers, one boolean mask per worker beats a stable sort by worker.
_MAX_WORKERS_BY_MASK = 4


@dataclass
class Outbox:
    """Ticks buffered for one worker, and keys it has not been told about yet."""

    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    ticks: int = 0
    oldest_ns: int = 0  # wall clock when the oldest buffered tick was received
    new_keys: list[tuple[int, str | int]] = field(default_factory=list)


class WorkerTicks(NamedTuple):
    """One worker's share of a flush, in arrival order: its slots and the tick columns."""

    slots: Int64Array
    t: Int64Array
    p: Float64Array
    q: Float64Array


class KeyRouter:
    """Maps each key to (worker, slot): slots are dense per worker and assigned on first sight.

    ``codes`` maps every key routed so far to ``slot * workers + worker``. It only ever holds
    keys that passed the key rule, so the decoder may take it as its ``known`` keys. The dict
    object stays the same for the router's lifetime.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.codes: dict[str | int, int] = {}
        self.next_slot = [0] * workers

    def route(self, keys: list[str | int], outboxes: list[Outbox]) -> Int64Array:
        """Codes ``slot * workers + worker`` per tick; announces new keys in ``outboxes``."""
        return self._complete(np.full(len(keys), -1, dtype=np.int64), keys, outboxes)

    def split(self, decoded: DecodedTicks, outboxes: list[Outbox]) -> list[WorkerTicks]:
        """Each worker's ticks of a decoded flush, in arrival order; announces new keys in ``outboxes``.

        ``decoded`` must come from ``decode_payloads(payloads, router.codes)`` (or without
        ``known``).
        """
        codes = self._complete(decoded.codes, decoded.keys, outboxes)
        if self.workers == 1:
            return [WorkerTicks(codes, decoded.t, decoded.p, decoded.q)]
        workers = codes % self.workers
        slots = codes // self.workers
        return [
            WorkerTicks(slots[mine], decoded.t[mine], decoded.p[mine], decoded.q[mine])
            for mine in self._ticks_by_worker(workers)
        ]

    def announcement(self, worker: int) -> list[tuple[int, str | int]]:
        """Every ``(slot, key)`` of ``worker``: what its replacement must be told before any tick.

        Announcing all of them at once keeps the slots (and the ticks already buffered under
        them) valid across a worker restart. It runs once per restart, over the whole cache.
        """
        workers = self.workers
        return [(code // workers, key) for key, code in self.codes.items() if code % workers == worker]

    def _complete(self, codes: Int64Array, keys: list[str | int], outboxes: list[Outbox]) -> Int64Array:
        """``codes`` with the -1 of keys not routed before replaced by new codes."""
        missing = np.flatnonzero(codes < 0)
        if not len(missing):
            return codes
        keys = list(map(keys.__getitem__, missing.tolist()))
        found = np.fromiter(map(self.codes.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))
        unseen = found < 0
        if unseen.any():
            for key in dict.fromkeys(compress(keys, unseen.tolist())):
                self._assign(key, outboxes)
            found = np.fromiter(map(self.codes.__getitem__, keys), dtype=np.int64, count=len(keys))
        codes = codes.copy()
        codes[missing] = found
        return codes

    def _assign(self, key: str | int, outboxes: list[Outbox]) -> None:
        worker = shard_for(key, self.workers)
        slot = self.next_slot[worker]
        self.next_slot[worker] += 1
        self.codes[key] = slot * self.workers + worker
        outboxes[worker].new_keys.append((slot, key))

    def _ticks_by_worker(self, workers: Int64Array) -> list[Int64Array]:
        """Per worker, the indices of its ticks in arrival order."""
        if self.workers <= _MAX_WORKERS_BY_MASK:
            return [np.flatnonzero(workers == worker) for worker in range(self.workers)]
        order = np.argsort(workers.astype(np.uint16), kind="stable")
        bounds = np.searchsorted(workers[order], np.arange(self.workers + 1)).tolist()
        return [order[start:end] for start, end in pairwise(bounds)]
