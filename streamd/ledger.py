"""The tick ledger: ticks each ingest handed each worker, and ticks that worker has applied.

Two shared-memory arrays of int64, one cell per (ingest, worker) pair. Each cell has one writer:
``handed`` only by its ingest, ``applied`` only by its worker (or by the ingest writing off a
dead worker, while no worker is running in that slot). From them come the backlog that /metrics
reports, the ingest's flow control (a worker is idle for an ingest when it has applied all it
was handed) and the ``worker_lost`` count when a worker dies. One more cell per ingest counts
the ticks it has received and not handed over yet: what is lost if that ingest dies.

With ``[state]``, a third array holds, per (ingest, worker), the sequence number up to which the
worker's checkpoint on disk holds that ingest's ticks (written by the worker once the file is
durable): the ingest trims its replay journal to it. Sequence numbers belong to one run of the
daemon (``run_id``); a checkpoint of another run says nothing about this run's numbers.
"""

from __future__ import annotations

import uuid
from multiprocessing.context import SpawnContext
from typing import Any


class TickLedger:
    """Per (ingest, worker) counters of ticks handed over and ticks applied."""

    def __init__(self, ingests: int, workers: int, mp: SpawnContext) -> None:
        self.ingests = ingests
        self.workers = workers
        self._handed: Any = mp.Array("q", ingests * workers, lock=False)
        self._applied: Any = mp.Array("q", ingests * workers, lock=False)
        self._buffered: Any = mp.Array("q", ingests, lock=False)
        self._checkpointed: Any = mp.Array("q", ingests * workers, lock=False)
        self.run_id = uuid.uuid4().hex

    def _cell(self, ingest: int, worker: int) -> int:
        return ingest * self.workers + worker

    def handed(self, ingest: int, worker: int) -> int:
        """Ticks ``ingest`` has handed to ``worker`` since start: the sequence number of its next tick."""
        return int(self._handed[self._cell(ingest, worker)])

    def hand_over(self, ingest: int, worker: int, ticks: int) -> None:
        self._handed[self._cell(ingest, worker)] += ticks

    def applied(self, ingest: int, worker: int) -> int:
        return int(self._applied[self._cell(ingest, worker)])

    def mark_applied(self, ingest: int, worker: int, upto: int) -> None:
        """The worker has applied every tick of ``ingest`` before sequence number ``upto``."""
        self._applied[self._cell(ingest, worker)] = upto

    def checkpointed(self, ingest: int, worker: int) -> int:
        """``worker``'s checkpoint on disk holds every tick of ``ingest`` before this sequence number."""
        return int(self._checkpointed[self._cell(ingest, worker)])

    def mark_checkpointed(self, ingest: int, worker: int, upto: int) -> None:
        self._checkpointed[self._cell(ingest, worker)] = upto

    def in_flight(self, ingest: int, worker: int) -> int:
        cell = self._cell(ingest, worker)
        return int(self._handed[cell] - self._applied[cell])

    def write_off(self, ingest: int, worker: int) -> int:
        """Close the books of a dead worker for ``ingest``: return the ticks it never applied."""
        cell = self._cell(ingest, worker)
        lost = int(self._handed[cell] - self._applied[cell])
        self._applied[cell] = self._handed[cell]
        return max(0, lost)

    def buffer(self, ingest: int, ticks: int) -> None:
        """``ingest`` holds ``ticks`` more (received, not handed over yet); negative when they leave."""
        self._buffered[ingest] += ticks

    def held(self, ingest: int) -> int:
        """Ticks ``ingest`` holds or has handed over that no worker has applied yet."""
        cells = range(ingest * self.workers, (ingest + 1) * self.workers)
        in_flight = sum(max(0, self._handed[c] - self._applied[c]) for c in cells)
        return int(self._buffered[ingest] + in_flight)

    def take_buffered(self, ingest: int) -> int:
        """What a dead ``ingest`` still held: zeroed, for its replacement to count as lost."""
        held = int(self._buffered[ingest])
        self._buffered[ingest] = 0
        return max(0, held)

    def backlog(self, worker: int) -> int:
        """Ticks handed to ``worker`` by any ingest and not applied yet."""
        return sum(max(0, self.in_flight(ingest, worker)) for ingest in range(self.ingests))

    def applied_total(self, worker: int) -> int:
        return sum(self.applied(ingest, worker) for ingest in range(self.ingests))
