"""The internal wire between the ingest process and a worker: pure encode/decode functions.

A data batch is five frames: a small msgpack header, then the raw little-endian NumPy
buffers of the slot, time, price and quantity columns. Columns move as buffers, never
re-encoded per tick. Keys travel once per key lifetime: the ingest assigns each key a
dense slot in its worker and announces ``[slot, key]`` pairs in the header of the first
batch that carries the key (and again after the worker was restarted).

Control messages (end of input, new signal definitions) travel in-band on the same
socket, so they take effect exactly at a batch boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from streamd.config import SignalSpec

_SLOT = np.dtype("<i8")
_TIME = np.dtype("<i8")
_FLOAT = np.dtype("<f8")


@dataclass(frozen=True)
class WorkerBatch:
    """Ticks for one worker, in arrival order."""

    slots: np.ndarray
    t: np.ndarray
    p: np.ndarray
    q: np.ndarray
    new_keys: list[tuple[int, str | int]]
    recv_ns: int  # wall clock when the oldest tick of the batch was received by the ingest
    seq_start: int  # ticks handed to this worker before this batch (for loss accounting)


@dataclass(frozen=True)
class Reconfigure:
    signals: tuple[SignalSpec, ...]


@dataclass(frozen=True)
class EndOfInput:
    """The ingest has stopped intake; the worker drains and exits."""


Message = WorkerBatch | Reconfigure | EndOfInput


def encode_batch(batch: WorkerBatch) -> list[Any]:
    header = {
        "n": len(batch.t),
        "new": [list(pair) for pair in batch.new_keys],
        "recv_ns": batch.recv_ns,
        "seq": batch.seq_start,
    }
    return [
        msgpack.packb(header),
        np.ascontiguousarray(batch.slots, _SLOT),
        np.ascontiguousarray(batch.t, _TIME),
        np.ascontiguousarray(batch.p, _FLOAT),
        np.ascontiguousarray(batch.q, _FLOAT),
    ]


def _spec_to_list(spec: SignalSpec) -> list[Any]:
    return [spec.name, spec.window, spec.size, list(spec.stats), spec.emit_interval_ns, spec.publish]


def _spec_from_list(item: list[Any]) -> SignalSpec:
    name, window, size, stats, emit_interval_ns, publish = item
    return SignalSpec(name, window, size, tuple(stats), emit_interval_ns, publish)


def encode_reconfigure(signals: tuple[SignalSpec, ...]) -> list[bytes]:
    return [msgpack.packb({"signals": [_spec_to_list(s) for s in signals]})]


def encode_end_of_input() -> list[bytes]:
    return [msgpack.packb({"eof": True})]


def decode(frames: list[Any]) -> Message:
    """Decode frames produced by the ``encode_*`` functions of this module."""
    header = msgpack.unpackb(frames[0], strict_map_key=False)
    if "eof" in header:
        return EndOfInput()
    if "signals" in header:
        return Reconfigure(tuple(_spec_from_list(item) for item in header["signals"]))
    n = header["n"]
    columns = [
        np.frombuffer(frame, dtype) for frame, dtype in zip(frames[1:], (_SLOT, _TIME, _FLOAT, _FLOAT), strict=True)
    ]
    if any(len(column) != n for column in columns):
        msg = f"worker batch header says {n} ticks, columns disagree"
        raise ValueError(msg)
    slots, t, p, q = columns
    return WorkerBatch(slots, t, p, q, [(s, k) for s, k in header["new"]], header["recv_ns"], header["seq"])
