"""The checkpoint file of one worker: pure encode/decode, no I/O.

A checkpoint is what a worker needs to come back exactly where it was: its keys (so that
local key indices map back to names, whoever numbers the slots next), every signal's state
(:meth:`streamd.windows.Engine.export_state`), and, per ingest, the sequence number up to
which that state holds the ingest's ticks (what the ingest must replay from its journal).

Layout, all little-endian::

    magic "STRMDCKP" | u32 format version | u64 header length | msgpack header
    | raw array buffers, in the header's order | u32 CRC-32 of everything before it

The header names the format, the engine's state layout, the signal specs, the worker index
and count, the run (sequence numbers only mean something within one run of the daemon), the
applied sequence numbers, the wall time of the snapshot and the newest event time it holds,
and each array's name, dtype and shape. Arrays travel as raw buffers, as on the internal wire
(:mod:`streamd.transport`): never pickled, and the CRC catches a torn or corrupted file.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from numpy.typing import NDArray

from streamd.config import SignalSpec
from streamd.windows import STATE_LAYOUT, EngineState, SignalState

FORMAT_VERSION = 1
MAGIC = b"STRMDCKP"
_PREAMBLE = struct.Struct("<8sIQ")
_CRC = struct.Struct("<I")
_DTYPES = {"<i8": np.dtype("<i8"), "<f8": np.dtype("<f8")}


class CheckpointError(ValueError):
    """A checkpoint cannot be read: not one, another format version, truncated or corrupted."""


@dataclass(frozen=True)
class Checkpoint:
    """One worker's state at one moment, and where each ingest's stream stood."""

    worker: int
    workers: int
    run_id: str  # the daemon run the sequence numbers belong to
    applied: tuple[int, ...]  # per ingest: the state holds that ingest's ticks before this sequence number
    wall_ns: int  # when the snapshot was taken
    newest_event_ns: int  # newest tick time applied (0: none)
    final: bool  # written at a clean shutdown: nothing was received after it
    keys: tuple[str | int, ...]  # local key index -> key
    state: EngineState


def encode(checkpoint: Checkpoint) -> list[bytes | memoryview]:
    """The file's pieces, to be written in order (arrays are not copied)."""
    arrays: list[tuple[str, NDArray[Any]]] = [("last_t", checkpoint.state.last_t)]
    signals = []
    for index, signal in enumerate(checkpoint.state.signals):
        spec = signal.spec
        signals.append({"name": spec.name, "window": spec.window, "size": spec.size, "stats": list(spec.stats)})
        signals[-1]["needs"] = list(signal.needs)
        arrays.extend((f"{index}/{name}", array) for name, array in signal.arrays.items())
    buffers = [np.ascontiguousarray(array, array.dtype.newbyteorder("<")) for _, array in arrays]
    header = {
        "layout": STATE_LAYOUT,
        "worker": checkpoint.worker,
        "workers": checkpoint.workers,
        "run": checkpoint.run_id,
        "applied": list(checkpoint.applied),
        "wall_ns": checkpoint.wall_ns,
        "newest_event_ns": checkpoint.newest_event_ns,
        "final": checkpoint.final,
        "keys": list(checkpoint.keys),
        "signals": signals,
        "arrays": [
            [name, buffer.dtype.str, list(buffer.shape)] for (name, _), buffer in zip(arrays, buffers, strict=True)
        ],
    }
    packed = msgpack.packb(header)
    pieces: list[bytes | memoryview] = [_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(packed)), packed]
    pieces.extend(buffer.reshape(-1).view(np.uint8).data for buffer in buffers)
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    pieces.append(_CRC.pack(crc))
    return pieces


def decode(data: bytes | memoryview) -> Checkpoint:
    """Read a checkpoint; anything but an intact file of this format is a :class:`CheckpointError`."""
    view = memoryview(data).cast("B")
    if len(view) < _PREAMBLE.size + _CRC.size:
        msg = f"too short for a checkpoint ({len(view)} bytes)"
        raise CheckpointError(msg)
    magic, version, header_size = _PREAMBLE.unpack_from(view)
    if magic != MAGIC:
        msg = "not a streamd checkpoint (bad magic)"
        raise CheckpointError(msg)
    if version != FORMAT_VERSION:
        msg = f"checkpoint format version {version}; this streamd reads version {FORMAT_VERSION}"
        raise CheckpointError(msg)
    (crc,) = _CRC.unpack_from(view, len(view) - _CRC.size)
    if zlib.crc32(view[: len(view) - _CRC.size]) != crc:
        msg = "checksum mismatch (truncated or corrupted file)"
        raise CheckpointError(msg)
    start = _PREAMBLE.size + header_size
    try:
        header = msgpack.unpackb(view[_PREAMBLE.size : start], strict_map_key=False)
        return _from_header(header, view[start : len(view) - _CRC.size])
    except (KeyError, TypeError, ValueError, IndexError, msgpack.UnpackException) as exc:
        if isinstance(exc, CheckpointError):
            raise
        msg = f"malformed checkpoint header ({type(exc).__name__}: {exc})"
        raise CheckpointError(msg) from None


def _from_header(header: dict[str, Any], body: memoryview) -> Checkpoint:
    if header["layout"] != STATE_LAYOUT:
        msg = f"engine state layout {header['layout']}; this streamd keeps layout {STATE_LAYOUT}"
        raise CheckpointError(msg)
    arrays: dict[str, NDArray[Any]] = {}
    offset = 0
    for name, dtype_name, shape in header["arrays"]:
        dtype = _DTYPES[dtype_name]
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + size > len(body):
            msg = f"array {name!r} runs past the end of the file"
            raise CheckpointError(msg)
        arrays[name] = np.frombuffer(body[offset : offset + size], dtype).reshape(shape)
        offset += size
    if offset != len(body):
        msg = f"{len(body) - offset} bytes after the last array"
        raise CheckpointError(msg)
    signals = []
    for index, signal in enumerate(header["signals"]):
        spec = SignalSpec(signal["name"], signal["window"], int(signal["size"]), tuple(signal["stats"]))
        prefix = f"{index}/"
        own = {name[len(prefix) :]: array for name, array in arrays.items() if name.startswith(prefix)}
        signals.append(SignalState(spec, tuple(signal["needs"]), own))
    return Checkpoint(
        worker=int(header["worker"]),
        workers=int(header["workers"]),
        run_id=str(header["run"]),
        applied=tuple(int(seq) for seq in header["applied"]),
        wall_ns=int(header["wall_ns"]),
        newest_event_ns=int(header["newest_event_ns"]),
        final=bool(header["final"]),
        keys=tuple(header["keys"]),
        state=EngineState(arrays["last_t"], tuple(signals)),
    )
