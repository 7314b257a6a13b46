"""Which worker owns a key: a hash that is stable across processes, restarts and hosts.

Python's built-in ``hash()`` is salted per process, so it cannot be used. Keys are hashed
with BLAKE2b over a type-tagged encoding (``s`` + UTF-8 for strings, ``i`` + 8-byte
signed little-endian for integers), so the string ``"5"`` and the integer ``5`` are
different keys and may live on different workers. The hash runs once per key lifetime:
the ingest process caches the answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt


def key_bytes(key: str | int) -> bytes:
    """The canonical, type-tagged byte encoding of a key."""
    if isinstance(key, str):
        return b"s" + key.encode("utf-8")
    return b"i" + key.to_bytes(8, "little", signed=True)


def shard_for(key: str | int, workers: int) -> int:
    """The worker index (0 <= index < workers) that owns ``key``."""
    digest = hashlib.blake2b(key_bytes(key), digest_size=8).digest()
    return int.from_bytes(digest, "little") % workers


def shards_for(keys: Sequence[str | int], workers: int) -> npt.NDArray[np.int64]:
    """:func:`shard_for` of many keys at once: one digest per key, the modulo vectorised."""
    if workers == 1:
        return np.zeros(len(keys), np.int64)
    blake2b = hashlib.blake2b
    digests = b"".join([blake2b(key_bytes(key), digest_size=8).digest() for key in keys])
    return (np.frombuffer(digests, "<u8") % np.uint64(workers)).astype(np.int64)
