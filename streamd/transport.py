"""The internal wire between the ingest processes and the workers: pure encode/decode functions.

A data batch is five frames: a small msgpack header, then the raw little-endian NumPy
buffers of the slot, time, price and quantity columns. Columns move as buffers, never
re-encoded per tick. Keys travel once per key lifetime: each ingest assigns each key a
dense slot in its worker and announces ``(slot, key)`` pairs (as a slot column and a key list)
in the header of the first
batch that carries the key (and again after the worker was restarted). When the ingest evicts
a silent key (``[state] key_ttl``) it lists the key's slot as *gone* in the next batch to that
worker: the worker unmaps it after that batch's ticks, and the ingest reuses the slot only for
keys announced in later batches. Slots are private
to one incarnation of one ingest and one worker, so the header names the ingest and its
generation (a restarted ingest numbers its slots afresh).

The header also carries the worker *generation* the batch was meant for: a batch queued
for a worker that has since died is recognised and discarded by its replacement.

End of input travels in-band on the same socket, after the ingest's last batch. Going
the other way, a worker sends each ingest a one-frame *ack* after applying its batches:
it wakes the ingest, whose flow control reads the applied counts from the ledger.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import msgpack
import numpy as np

_SLOT = np.dtype("<i8")
_TIME = np.dtype("<i8")
_FLOAT = np.dtype("<f8")
_ACK = struct.Struct("<qq")


@dataclass(frozen=True)
class WorkerBatch:
    """Ticks for one worker from one ingest, in arrival order."""

    slots: np.ndarray
    t: np.ndarray
    p: np.ndarray
    q: np.ndarray
    new_keys: list[tuple[int, str | int]]
    recv_ns: int  # wall clock when the oldest tick of the batch was received by the ingest
    ingest: int  # which ingest sent it: slots and sequence numbers are per (ingest, worker)
    ingest_generation: int  # which incarnation of that ingest: a restarted ingest numbers slots afresh
    generation: int  # the worker generation it was sent to
    seq_start: int  # ticks this ingest handed to this worker before this batch (the ledger)
    gone: list[int] = field(default_factory=list)  # slots released by the ingest, unmapped after the ticks


@dataclass(frozen=True)
class EndOfInput:
    """``ingest`` has stopped intake and sent its last batch."""

    ingest: int


@dataclass(frozen=True)
class PartitionOwned:
    """Cluster mode: this instance owns ``partition`` under fencing ``token``.

    ``live`` False: what follows is a replay that rebuilds windows and must not be published;
    True: the partition is caught up and its records go out, stamped with ``token``. Sent
    in-band, so every batch before it was read under the previous state.
    """

    partition: int
    token: int
    live: bool


@dataclass(frozen=True)
class PartitionDropped:
    """Cluster mode: this instance no longer owns ``partition``; forget its keys' windows."""

    partition: int


Message = WorkerBatch | EndOfInput | PartitionOwned | PartitionDropped


def encode_batch(batch: WorkerBatch) -> list[Any]:
    header: dict[str, Any] = {
        "n": len(batch.t),
        "new_slots": np.fromiter(map(itemgetter(0), batch.new_keys), _SLOT, len(batch.new_keys)).tobytes(),
        "new_keys": list(map(itemgetter(1), batch.new_keys)),
        "recv_ns": batch.recv_ns,
        "i": batch.ingest,
        "ig": batch.ingest_generation,
        "g": batch.generation,
        "seq": batch.seq_start,
    }
    if batch.gone:
        header["gone"] = np.asarray(batch.gone, _SLOT).tobytes()
    return [
        msgpack.packb(header),
        np.ascontiguousarray(batch.slots, _SLOT),
        np.ascontiguousarray(batch.t, _TIME),
        np.ascontiguousarray(batch.p, _FLOAT),
        np.ascontiguousarray(batch.q, _FLOAT),
    ]


def encode_end_of_input(ingest: int) -> list[bytes]:
    return [msgpack.packb({"eof": ingest})]


def encode_partition_owned(owned: PartitionOwned) -> list[bytes]:
    return [msgpack.packb({"own": owned.partition, "token": owned.token, "live": owned.live})]


def encode_partition_dropped(partition: int) -> list[bytes]:
    return [msgpack.packb({"drop": partition})]


def decode(frames: list[Any]) -> Message:
    """Decode frames produced by the ``encode_*`` functions of this module."""
    header = msgpack.unpackb(frames[0], strict_map_key=False)
    if "eof" in header:
        return EndOfInput(header["eof"])
    if "own" in header:
        return PartitionOwned(header["own"], header["token"], header["live"])
    if "drop" in header:
        return PartitionDropped(header["drop"])
    n = header["n"]
    columns = [
        np.frombuffer(frame, dtype) for frame, dtype in zip(frames[1:], (_SLOT, _TIME, _FLOAT, _FLOAT), strict=True)
    ]
    if any(len(column) != n for column in columns):
        msg = f"worker batch header says {n} ticks, columns disagree"
        raise ValueError(msg)
    slots, t, p, q = columns
    new_keys = list(zip(np.frombuffer(header["new_slots"], _SLOT).tolist(), header["new_keys"], strict=True))
    gone = np.frombuffer(header["gone"], _SLOT).tolist() if "gone" in header else []
    return WorkerBatch(
        slots, t, p, q, new_keys, header["recv_ns"], header["i"], header["ig"], header["g"], header["seq"], gone
    )


def encode_ack(worker: int, generation: int) -> bytes:
    """worker -> ingest: "I applied what you sent me" (the counts are in the ledger)."""
    return _ACK.pack(worker, generation)


def decode_ack(frame: bytes) -> tuple[int, int]:
    """``(worker, generation)`` of an ack."""
    worker, generation = _ACK.unpack(frame)
    return int(worker), int(generation)
