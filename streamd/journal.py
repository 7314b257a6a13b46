"""The replay protocol between an ingest and a worker that may die: pure bookkeeping, no I/O.

Every tick an ingest hands a worker has a sequence number: the ledger's ``handed`` count for
that (ingest, worker) pair when it left (:class:`streamd.ledger.TickLedger`). A worker's
checkpoint records, per ingest, the sequence number up to which its state holds that ingest's
ticks; once the checkpoint is on disk the worker says so in the ledger (``checkpointed``).

* The ingest keeps a :class:`ReplayJournal` per worker: the batches it handed over since that
  worker's last durable checkpoint, bounded in bytes. When the worker dies, the ingest sends
  the journal to the replacement, which has loaded the checkpoint.
* The worker puts what arrives through a :class:`ReplayFilter`: ticks its state already holds
  are skipped; ticks its dead predecessor had applied (and counted and published) are applied
  *quietly*, to rebuild the windows without publishing or counting them twice; the rest are
  new. A gap (ticks the journal no longer had) is reported. A gap in new ticks that stays open
  is written off: the batches in it never left a dead ingest, and nobody else counted them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from streamd.transport import WorkerBatch

BYTES_PER_TICK = 32  # slot, time, price, quantity


@dataclass(frozen=True)
class JournalEntry:
    """Ticks handed over in one batch, from sequence number ``seq``."""

    seq: int
    slots: np.ndarray
    t: np.ndarray
    p: np.ndarray
    q: np.ndarray

    @property
    def end(self) -> int:
        return self.seq + len(self.t)


class ReplayJournal:
    """Ingest side, one per worker: the batches handed over since that worker's last checkpoint.

    Bounded in bytes: when a new batch would exceed the bound, the oldest batches are evicted
    and :meth:`record` returns how many ticks can no longer be replayed after a kill.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.bytes = 0
        self._entries: deque[JournalEntry] = deque()

    @property
    def start(self) -> int | None:
        """Sequence number of the oldest tick held, None when empty."""
        return self._entries[0].seq if self._entries else None

    def record(self, entry: JournalEntry) -> int:
        """Keep a batch just handed over; return the ticks evicted to stay within the bound."""
        self._entries.append(entry)
        self.bytes += len(entry.t) * BYTES_PER_TICK
        evicted = 0
        while self.bytes > self.limit_bytes and self._entries:
            evicted += self._pop()
        return evicted

    def trim(self, checkpointed: int) -> None:
        """Forget batches wholly below ``checkpointed``: a checkpoint on disk holds them."""
        while self._entries and self._entries[0].end <= checkpointed:
            self._pop()

    def replay(self, chunk: int) -> Iterator[JournalEntry]:
        """Everything held, oldest first, merged into entries of at most ``chunk`` ticks."""
        entries = list(self._entries)
        while entries:
            run = [entries.pop(0)]
            while entries and entries[0].seq == run[-1].end and sum(len(e.t) for e in run) < chunk:
                run.append(entries.pop(0))
            columns = [
                np.concatenate(c) if len(run) > 1 else c[0]
                for c in zip(*((e.slots, e.t, e.p, e.q) for e in run), strict=True)
            ]
            for start in range(0, len(columns[1]), chunk):
                slots, t, p, q = (column[start : start + chunk] for column in columns)
                yield JournalEntry(run[0].seq + start, slots, t, p, q)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _pop(self) -> int:
        entry = self._entries.popleft()
        self.bytes -= len(entry.t) * BYTES_PER_TICK
        return len(entry.t)


def _part(batch: WorkerBatch, lo: int, hi: int) -> WorkerBatch:
    """Ticks ``[lo, hi)`` of a batch (positions within it), keeping its header."""
    if lo == 0 and hi == len(batch.t):
        return batch
    return replace(
        batch,
        slots=batch.slots[lo:hi],
        t=batch.t[lo:hi],
        p=batch.p[lo:hi],
        q=batch.q[lo:hi],
        seq_start=batch.seq_start + lo,
    )


@dataclass
class Sorted:
    """A drain's batches sorted by what the worker does with them."""

    quiet: list[WorkerBatch]  # replayed ticks the dead predecessor had already applied and published
    new: list[WorkerBatch]  # ticks to apply, count and publish
    missing: int  # ticks between what the state holds and what arrived: not replayable
    filled: int = 0  # ticks of batches overtaken by later ones, applied now (they close a gap)


@dataclass(frozen=True)
class Gap:
    """Sequence numbers ``[lo, hi)`` of an ingest that were skipped, and when (monotonic seconds)."""

    lo: int
    hi: int
    opened: float


class ReplayFilter:
    """Worker side: per ingest, the sequence number its state holds ticks up to, and the one
    up to which replayed ticks were already applied and published by a dead predecessor."""

    def __init__(self, next_seq: Sequence[int], quiet_upto: Sequence[int]) -> None:
        self.next_seq = list(next_seq)
        self.quiet_upto = list(quiet_upto)
        self.gaps: list[list[Gap]] = [[] for _ in next_seq]  # per ingest: skipped ranges, oldest first

    def sort(self, batches: Sequence[WorkerBatch], now: float) -> Sorted:
        """Skip what the state holds, split the rest at ``quiet_upto``.

        An ingest's batches arrive in order on one pipe, but a replaced ingest's last batches may
        still wait in the old pipe when its successor's first arrive on a new one, and the worker's
        socket takes the pipes in turn. The range they were overtaken on is kept as a gap, and a
        batch that falls in it is applied when it comes (its ticks may then be late for their keys).
        """
        result = Sorted([], [], 0)
        for batch in batches:
            ingest, n = batch.ingest, len(batch.t)
            held = self.next_seq[ingest]
            if batch.seq_start < held and self._fill(ingest, batch.seq_start, batch.seq_start + n):
                result.new.append(batch)
                result.filled += n
                continue
            if batch.seq_start > held:
                result.missing += batch.seq_start - held
                self.gaps[ingest].append(Gap(held, batch.seq_start, now))
            skip = min(n, max(0, held - batch.seq_start))
            quiet = min(n, max(skip, self.quiet_upto[ingest] - batch.seq_start))
            if quiet > skip:
                result.quiet.append(_part(batch, skip, quiet))
            if n > quiet:
                result.new.append(_part(batch, quiet, n))
            self.next_seq[ingest] = max(held, batch.seq_start + n)
        return result

    def _fill(self, ingest: int, start: int, end: int) -> bool:
        """Take ``[start, end)`` out of a recorded gap of ``ingest``; False if no gap holds it."""
        gaps = self.gaps[ingest]
        for i, gap in enumerate(gaps):
            if gap.lo <= start and end <= gap.hi:
                rest = (Gap(gap.lo, start, gap.opened), Gap(end, gap.hi, gap.opened))
                gaps[i : i + 1] = [part for part in rest if part.lo < part.hi]
                return True
        return False

    def write_off(self, now: float, grace: float) -> int:
        """Close the gaps open longer than ``grace`` seconds; return the ticks in them nobody counted.

        An overtaken batch arrives within moments of its successor's first, so one that has not
        come by then died in the send queue of the ingest that handed it over. Ticks below
        ``quiet_upto`` were counted by the dead predecessor (or written off as ``worker_lost``);
        the rest were counted as received and nowhere else. A batch that still falls in a
        closed gap is skipped as held, so nothing is counted twice.
        """
        lost = 0
        for ingest, gaps in enumerate(self.gaps):
            expired = [gap for gap in gaps if now - gap.opened > grace]
            lost += sum(max(0, gap.hi - max(gap.lo, self.quiet_upto[ingest])) for gap in expired)
            if expired:
                self.gaps[ingest] = [gap for gap in gaps if now - gap.opened <= grace]
        return lost

    def applied(self, ingest: int) -> int:
        """What to mark applied in the ledger: never below what a predecessor already counted."""
        return max(self.next_seq[ingest], self.quiet_upto[ingest])
