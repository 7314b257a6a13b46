"""A worker's keys: a dense local index per key, each ingest's slot -> local index, and their reuse.

Each ingest numbers the keys it sends a worker on its own, and a replaced ingest numbers them
afresh, so the same key may arrive under different slots from different ingests (or
incarnations of one); all of them lead to the one local index that the engine and the
publishers use. A local index counts the slots that map it. When an ingest announces a slot
*gone* (the key was silent for ``state.key_ttl`` there) the slot is unmapped; a local index
that no slot maps any more is *dying*: its key is forgotten at once (so a returning key gets a
fresh index and empty windows), and once the worker has dropped its state everywhere
(:meth:`KeyTable.take_dying`, then :meth:`KeyTable.recycle`) the index goes to a free list for
the next new key. Everything here is batched: no Python loop per tick, one C-level ``map`` per
announced or released key.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from itertools import compress, repeat

import numpy as np
import numpy.typing as npt

Int64Array = npt.NDArray[np.int64]
_UNMAPPED = -1


class KeyTable:
    """Keys by local index, slot tables per (ingest, generation), reference counts and a free list."""

    def __init__(self) -> None:
        self.keys = np.empty(0, dtype=object)  # per local index: its key (None while free)
        self.count = 0  # local indices ever handed out: the engine's tables are this long
        self._index: dict[str | int, int] = {}
        self._refs = np.zeros(0, np.int32)  # per local index: slots mapping it
        self._free: list[int] = []
        self._dying: list[Int64Array] = []
        self._tables: dict[tuple[int, int], Int64Array] = {}
        self._used: dict[tuple[int, int], float] = {}  # per table: when a batch last used it
        self._unclaimed: Int64Array = np.zeros(0, np.int64)  # restored indices, until retire_unclaimed
        self._restored_at = 0.0

    @property
    def live(self) -> int:
        """Keys mapped by at least one ingest slot."""
        return len(self._index)

    def learn(self, ingest: int, generation: int, announced: list[tuple[int, str | int]]) -> list[str | int]:
        """Map an ingest's new ``(slot, key)`` pairs; return the keys that got a new local index."""
        table = self._table(ingest, generation)
        if not announced:
            return []
        slot_list, keys = zip(*announced, strict=True)
        slots = np.array(slot_list, np.int64)
        local = np.fromiter(map(self._index.get, keys, repeat(_UNMAPPED)), np.int64, len(keys))
        unseen = local < 0
        new: list[str | int] = []
        if unseen.any():
            new = list(dict.fromkeys(compress(keys, unseen.tolist())))
            indices = self._allocate(len(new))
            self._index.update(zip(new, indices.tolist(), strict=True))
            self.keys[indices] = new
            if len(new) == np.count_nonzero(unseen):  # distinct, as one ingest announces them
                local[unseen] = indices
            else:
                local = np.fromiter(map(self._index.__getitem__, keys), np.int64, len(keys))
        table = self._cover(ingest, generation, table, int(slots.max()) + 1)
        changed = table[slots] != local
        slots, local = slots[changed], local[changed]
        self._unmap(table, slots)
        table[slots] = local
        np.add.at(self._refs, local, 1)
        return new

    def restore(self, keys: Sequence[str | int | None], now: float = 0.0) -> None:
        """Start from a checkpoint's keys: key ``i`` gets local index ``i`` (None: a free index).

        Restored keys are mapped by no slot until an ingest announces them again (by name);
        :meth:`retire_unclaimed` lets go of those that no ingest announces (``now``: a monotonic time).
        """
        self.keys = np.empty(max(len(keys), 1), dtype=object)
        self.keys[: len(keys)] = keys
        self.count = len(keys)
        self._index = {key: index for index, key in enumerate(keys) if key is not None}
        self._refs = np.zeros(len(self.keys), np.int32)
        self._free = [index for index, key in enumerate(keys) if key is None]
        self._dying.clear()
        self._unclaimed = np.fromiter(self._index.values(), np.int64, len(self._index))
        self._restored_at = now

    def retire_unclaimed(self, now: float, ttl: float) -> None:
        """Restored keys no ingest announced within ``ttl`` seconds of the restore start dying.

        No ingest holds their slots, so no ingest's ``key_ttl`` sweep would ever release them;
        a key that went silent before the restart must not keep its state forever.
        """
        if not len(self._unclaimed) or now - self._restored_at < ttl:
            return
        candidates = self._unclaimed[self._refs[self._unclaimed] == 0]
        self._unclaimed = np.zeros(0, np.int64)
        keys = self.keys[candidates]
        still_theirs = np.fromiter(map(self._index.get, keys.tolist(), repeat(_UNMAPPED)), np.int64, len(keys))
        dead = candidates[still_theirs == candidates]
        if len(dead):
            deque(map(self._index.pop, self.keys[dead].tolist()), maxlen=0)
            self._dying.append(dead)

    def indices(self, keys: Sequence[str | int]) -> Int64Array:
        """Local indices of known keys."""
        return np.fromiter(map(self._index.__getitem__, keys), np.int64, len(keys))

    def local(self, ingest: int, generation: int, slots: Int64Array, now: float = 0.0) -> Int64Array:
        """Local key indices of an ingest's slots (``now``: a monotonic time, to age old incarnations)."""
        self._used[ingest, generation] = now
        local: Int64Array = self._tables[ingest, generation][slots]
        return local

    def forget(self, ingest: int, generation: int, gone: list[int]) -> None:
        """Unmap slots an ingest released; keys no slot maps any more start dying."""
        table = self._tables.get((ingest, generation))
        if table is None or not gone:
            return
        slots = np.asarray(gone, np.int64)
        self._unmap(table, slots[slots < len(table)])

    def retire_superseded(self, now: float, grace: float) -> None:
        """Unmap every slot of an ingest incarnation that was replaced and sent nothing for ``grace`` seconds.

        A dead incarnation never announces its slots gone; its batches still queued arrive
        within moments of its death, so after the grace nothing can use its table.
        """
        newest: dict[int, int] = {}
        for ingest, generation in self._tables:
            newest[ingest] = max(generation, newest.get(ingest, generation))
        for ingest, generation in list(self._tables):
            if generation < newest[ingest] and now - self._used.get((ingest, generation), 0.0) > grace:
                self._retire(ingest, generation)

    @property
    def dying(self) -> int:
        """Local indices no slot maps any more, not yet taken."""
        return sum(len(indices) for indices in self._dying)

    def take_dying(self, most: int | None = None) -> Int64Array:
        """Up to ``most`` (None: all) local indices no slot maps any more, oldest first: drop their
        state, then :meth:`recycle`. The others stay for a later call."""
        if not self._dying:
            return np.zeros(0, np.int64)
        dying = np.concatenate(self._dying) if len(self._dying) > 1 else self._dying[0]
        self._dying.clear()
        if most is not None and len(dying) > most:
            dying, rest = dying[:most], dying[most:]
            self._dying.append(rest)
        return dying

    def recycle(self, indices: Int64Array) -> None:
        """Dying indices whose state is gone: the next new keys get them."""
        self.keys[indices] = None
        self._free.extend(indices.tolist())

    def _allocate(self, count: int) -> Int64Array:
        """``count`` local indices: freed ones first, then new ones past :attr:`count`."""
        free = self._free
        reused = free[len(free) - min(count, len(free)) :]
        del free[len(free) - len(reused) :]
        start, self.count = self.count, self.count + count - len(reused)
        if self.count > len(self.keys):
            size = max(self.count, 2 * len(self.keys))
            keys = np.empty(size, dtype=object)
            keys[: len(self.keys)] = self.keys
            refs = np.zeros(size, np.int32)
            refs[: len(self._refs)] = self._refs
            self.keys, self._refs = keys, refs
        return np.concatenate([np.asarray(reused, np.int64), np.arange(start, self.count, dtype=np.int64)])

    def _unmap(self, table: Int64Array, slots: Int64Array) -> None:
        """Clear these slots of ``table``; local indices left with no slot start dying."""
        old = table[slots]
        mapped = old >= 0
        if not mapped.any():
            return
        old = old[mapped]
        table[slots[mapped]] = _UNMAPPED
        np.subtract.at(self._refs, old, 1)
        dead = self._distinct(old[self._refs[old] == 0])
        if len(dead):
            deque(map(self._index.pop, self.keys[dead].tolist()), maxlen=0)
            self._dying.append(dead)

    def _distinct(self, dead: Int64Array) -> Int64Array:
        """``dead`` (indices whose count is 0) without repeats, in one pass: each writes its position."""
        if len(dead) < 2:
            return dead
        position = np.arange(len(dead), dtype=np.int32)
        self._refs[dead] = position
        kept: Int64Array = dead[self._refs[dead] == position]
        self._refs[dead] = 0
        return kept

    def _table(self, ingest: int, generation: int) -> Int64Array:
        table = self._tables.get((ingest, generation))
        if table is None:
            table = self._tables[ingest, generation] = np.zeros(0, np.int64)
            for old in [k for k in self._tables if k[0] == ingest and k[1] < generation - 1]:
                self._retire(*old)
        return table

    def _cover(self, ingest: int, generation: int, table: Int64Array, size: int) -> Int64Array:
        """``table`` grown (by doubling, new slots unmapped) to hold ``size`` slots."""
        if size <= len(table):
            return table
        grown = np.full(max(size, 2 * len(table)), _UNMAPPED, np.int64)
        grown[: len(table)] = table
        self._tables[ingest, generation] = grown
        return grown

    def _retire(self, ingest: int, generation: int) -> None:
        table = self._tables.pop((ingest, generation))
        self._used.pop((ingest, generation), None)
        self._unmap(table, np.flatnonzero(table >= 0))
