"""Which cluster partition a key belongs to: FNV-1a-32 of the key's bytes, mod the partition count.

In a cluster (``[cluster]``), every instance's ingest assigns each tick to partition
``fnv1a32(partition_bytes(key)) % partitions`` and publishes it on ``streamd.ticks.<p>``. The
hash is the one the NATS server's ``partition(n, ...)`` subject mapping uses, so a producer
that publishes one subject per key (``ticks.<key>``) and lets the server map it onto
partitions lands every key exactly where a streamd ingest would have put it.

The bytes hashed are what the server would see as the key's subject token:

- a string key: its UTF-8 bytes (``"AAPL"`` -> ``b"AAPL"``);
- an integer key: its decimal digits in ASCII (``-5`` -> ``b"-5"``), as a subject token would
  spell it. So ``5`` and ``"5"`` share a partition; they remain two different keys in every
  window, a partition only says which instance computes them.

The partition count is part of a deployment's contract: changing it moves almost every key.
Per key the hash is a Python loop over its bytes, so callers cache it per key lifetime, as
the router caches its shard; :func:`partitions_for` hashes many keys at once in NumPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

FNV_OFFSET = 0x811C9DC5
FNV_PRIME = 0x01000193
_MASK = 0xFFFFFFFF


def fnv1a32(data: bytes) -> int:
    """The 32-bit FNV-1a hash of ``data`` (Go's ``hash/fnv.New32a``)."""
    value = FNV_OFFSET
    for byte in data:
        value = ((value ^ byte) * FNV_PRIME) & _MASK
    return value


def partition_bytes(key: str | int) -> bytes:
    """The bytes of ``key`` that decide its partition: UTF-8 for strings, decimal ASCII for integers."""
    if isinstance(key, str):
        return key.encode("utf-8")
    return str(int(key)).encode("ascii")


def partition_for(key: str | int, partitions: int) -> int:
    """The partition (0 <= p < partitions) that ``key`` belongs to."""
    return fnv1a32(partition_bytes(key)) % partitions


def partitions_for(keys: Sequence[str | int], partitions: int) -> npt.NDArray[np.int64]:
    """:func:`partition_for` of every key, vectorised over the keys (one pass per byte position)."""
    encoded = [partition_bytes(key) for key in keys]
    if not encoded:
        return np.zeros(0, np.int64)
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    width = max(int(lengths.max()), 1)
    matrix = np.frombuffer(b"".join(b.ljust(width, b"\0") for b in encoded), np.uint8).reshape(-1, width)
    hashes = np.full(len(encoded), FNV_OFFSET, np.uint32)
    prime = np.uint32(FNV_PRIME)
    for position in range(width):
        live = lengths > position
        if live.all():
            hashes = (hashes ^ matrix[:, position]) * prime
        else:
            hashes[live] = (hashes[live] ^ matrix[live, position]) * prime
    return (hashes % np.uint32(partitions)).astype(np.int64)


def split_by_partition(
    partition_of_tick: npt.NDArray[np.integer[Any]], *columns: npt.NDArray[Any]
) -> dict[int, tuple[npt.NDArray[Any], ...]]:
    """Split tick columns by partition, keeping arrival order within each partition.

    ``partition_of_tick`` holds each tick's partition (from a per-key cache); the result maps
    each partition present to its slices of ``columns``, in the order the columns were given.
    """
    if not len(partition_of_tick):
        return {}
    order = np.argsort(partition_of_tick, kind="stable")
    ordered = partition_of_tick[order]
    present, starts = np.unique(ordered, return_index=True)
    bounds = [*starts.tolist(), len(ordered)]
    sorted_columns = [column[order] for column in columns]
    return {
        int(p): tuple(column[bounds[i] : bounds[i + 1]] for column in sorted_columns)
        for i, p in enumerate(present.tolist())
    }
