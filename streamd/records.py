"""Output protocol v1: pure functions between signal rows and ZeroMQ frames.

Record mode (the default): one two-frame message per signal per key touched,
``[b"{signal}.{key}", msgpack {"signal", "k", "t", "pub_ns", <stat>: value, ...}]``.
Batch mode: one two-frame message per signal per worker batch,
``[b"{signal}", msgpack {"signal", "pub_ns", "k": [...], "t": [...], <stat>: [...]}]``.
Undefined statistics (NaN inside the engine) are msgpack nil; ``count`` is an integer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np


def topic_for(signal: str, key: str | int) -> bytes:
    """The record topic ``{signal}.{key}``: subscribe to ``{signal}.`` or ``{signal}.{key}``."""
    return f"{signal}.{key}".encode()


def stat_values(name: str, column: np.ndarray) -> list[Any]:
    """A stat column as Python values with NaN turned into None (msgpack nil)."""
    if name == "count":
        counts: list[Any] = column.astype(np.int64).tolist()
        return counts
    undefined = np.isnan(column)
    if not undefined.any():
        values: list[Any] = column.tolist()
        return values
    boxed = column.astype(object)
    boxed[undefined] = None
    with_nil: list[Any] = boxed.tolist()
    return with_nil


def encode_records(
    signal: str,
    topics: Sequence[bytes],
    keys: Sequence[str | int],
    t: np.ndarray,
    stats: dict[str, np.ndarray],
    pub_ns: int,
) -> list[list[bytes]]:
    """One ``[topic, payload]`` pair per key."""
    names = list(stats)
    columns = [stat_values(name, stats[name]) for name in names]
    pack = msgpack.Packer().pack
    head = {"signal": signal}
    messages = []
    for topic, key, time_ns, *values in zip(topics, keys, t.tolist(), *columns, strict=True):
        record = head | {"k": key, "t": time_ns, "pub_ns": pub_ns}
        record.update(zip(names, values, strict=True))
        messages.append([topic, pack(record)])
    return messages


def encode_batch_record(
    signal: str, keys: Sequence[str | int], t: np.ndarray, stats: dict[str, np.ndarray], pub_ns: int
) -> list[bytes]:
    """One columnar ``[topic, payload]`` message for all rows of a batch."""
    record: dict[str, Any] = {"signal": signal, "pub_ns": pub_ns, "k": list(keys), "t": t.tolist()}
    for name, column in stats.items():
        record[name] = stat_values(name, column)
    return [signal.encode(), msgpack.packb(record)]


def decode_record(frames: Sequence[bytes]) -> dict[str, Any]:
    """Decode either kind of output message (for ``streamd tail`` and tests)."""
    record: dict[str, Any] = msgpack.unpackb(frames[-1], strict_map_key=False)
    return record
