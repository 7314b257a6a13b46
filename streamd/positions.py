"""Where each partition's output stands: the last stream sequence whose records have been published.

A takeover replays a partition silently so that its first records are exact. Silent must stop
where the previous owner's output stopped, not where the stream stood at takeover: ticks that
reached the stream while nobody owned the partition (its owner crashed, or every lease lapsed
during a JetStream election) were never published by anyone, and a replay that swallowed them
would leave a hole in the output that no later tick fills.

So an owner records, in the replicated KV bucket ``streamd_positions``, ``pos.<p>`` = the
sequence and stream time of the last message of ``p`` whose ticks every worker has applied
(and so published). It learns that from the ledger in two steps: a *candidate* taken right
after flushing every outbox (positions handed over, and the per-worker handed counts), and
*committed* once each worker's applied count has reached the candidate's handed count. Writes
lag the output by one or two intervals, which is the safe direction: a successor publishes a
few records twice (identical values, a newer fencing token), never none.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from streamd.leases import NATS_ERRORS

POSITIONS_BUCKET = "streamd_positions"
_KEY = "pos."


@dataclass(frozen=True)
class Position:
    """The last message of a partition whose records are out."""

    seq: int
    time_ns: int  # when the stream stored it: the replay for a successor starts a horizon before


@dataclass(frozen=True)
class _Candidate:
    handed: tuple[int, ...]  # per worker, ledger handed count when the candidate was taken
    positions: dict[int, Position]


class PositionBook:
    """Per-partition positions handed over, turned into published positions with the ledger's counts."""

    def __init__(self, handed: Callable[[], Sequence[int]], applied: Callable[[], Sequence[int]]) -> None:
        self._handed = handed
        self._applied = applied
        self._latest: dict[int, Position] = {}
        self._candidate: _Candidate | None = None

    def handed_over(self, partition: int, position: Position) -> None:
        """Record that ``position``'s ticks went into the outboxes."""
        self._latest[partition] = position

    def forget(self, partition: int) -> None:
        """The partition is no longer ours: nothing of it is committed from here on."""
        self._latest.pop(partition, None)
        if self._candidate is not None:
            self._candidate.positions.pop(partition, None)

    def settled(self) -> dict[int, Position]:
        """Every position handed over, if every worker has applied everything handed to it (else none)."""
        if all(a >= h for a, h in zip(self._applied(), self._handed(), strict=True)):
            return dict(self._latest)
        return {}

    def reset(self) -> None:
        """A worker was replaced: counts start again, so a pending candidate means nothing."""
        self._candidate = None

    def advance(self, flushed: bool) -> dict[int, Position]:
        """Commit the candidate if every worker applied it; take a new one if the outboxes are ``flushed``."""
        committed: dict[int, Position] = {}
        candidate = self._candidate
        if candidate is not None and all(a >= h for a, h in zip(self._applied(), candidate.handed, strict=True)):
            committed = candidate.positions
            self._candidate = None
        if self._candidate is None and flushed and self._latest:
            self._candidate = _Candidate(tuple(self._handed()), dict(self._latest))
        return committed


async def positions_bucket(js: JetStreamContext, replicas: int) -> KeyValue:
    """The positions bucket, found or created (no TTL: a position outlives its owner)."""
    try:
        return await js.key_value(POSITIONS_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(bucket=POSITIONS_BUCKET, history=1, replicas=replicas))


async def read_position(kv: KeyValue, partition: int) -> Position | None:
    """The partition's published position, None if nobody ever published it; retried through elections."""
    while True:
        try:
            entry = await asyncio.wait_for(kv.get(_KEY + str(partition)), 2)
        except nats.js.errors.KeyNotFoundError:
            return None
        except NATS_ERRORS:
            await asyncio.sleep(0.2)
            continue
        seq, time_ns = (int(x) for x in (entry.value or b"0 0").split())
        return Position(seq, time_ns)


async def write_positions(kv: KeyValue, positions: dict[int, Position], timeout: float) -> None:
    """Best effort: a write that fails only makes a successor publish a little more twice."""

    async def put(partition: int, position: Position) -> None:
        value = f"{position.seq} {position.time_ns}".encode()
        with contextlib.suppress(*NATS_ERRORS):
            await asyncio.wait_for(kv.put(_KEY + str(partition), value), timeout)

    await asyncio.gather(*(put(partition, position) for partition, position in positions.items()))
