"""Where a tick is sharded: each key is routed to the worker that owns it and to a dense slot there.

The owning worker comes from :func:`streamd.sharding.shard_for`, computed once per key and cached.
Slots are dense per worker and assigned on first sight, so that only small integers travel to the
worker with each tick; the key itself travels once, announced in the first batch that carries it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from streamd.sharding import shard_for


@dataclass
class Outbox:
    """Ticks buffered for one worker, and keys it has not been told about yet."""

    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    ticks: int = 0
    oldest_ns: int = 0  # wall clock when the oldest buffered tick was received
    new_keys: list[tuple[int, str | int]] = field(default_factory=list)


class KeyRouter:
    """Maps each key to (worker, slot): slots are dense per worker and assigned on first sight."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.codes: dict[str | int, int] = {}
        self.next_slot = [0] * workers

    def route(self, keys: list[str | int], outboxes: list[Outbox]) -> np.ndarray:
        """Codes ``slot * workers + worker`` per tick; announces new keys in ``outboxes``."""
        codes = list(map(self.codes.get, keys))
        if None in codes:
            for key in dict.fromkeys(k for k, c in zip(keys, codes, strict=True) if c is None):
                worker = shard_for(key, self.workers)
                slot = self.next_slot[worker]
                self.next_slot[worker] += 1
                self.codes[key] = slot * self.workers + worker
                outboxes[worker].new_keys.append((slot, key))
            codes = list(map(self.codes.__getitem__, keys))
        return np.array(codes, dtype=np.int64)

    def forget_worker(self, worker: int) -> None:
        """A restarted worker starts empty: its keys are announced again on next sight."""
        self.codes = {k: c for k, c in self.codes.items() if c % self.workers != worker}
        self.next_slot[worker] = 0
