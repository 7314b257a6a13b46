"""Output protocol v1: pure functions between signal rows and ZeroMQ frames.

Record mode (the default): one two-frame message per signal per key touched,
``[b"{signal}.{key}", msgpack {"signal", "k", "t", "pub_ns", <stat>: value, ...}]``.
Batch mode: one two-frame message per signal per worker batch,
``[b"{signal}", msgpack {"signal", "pub_ns", "k": [...], "t": [...], <stat>: [...]}]``.
Undefined statistics (NaN inside the engine) are msgpack nil; ``count`` is an integer.
In cluster mode every record also carries ``part`` (its key's partition) and ``fence`` (the
fencing token of the ownership term that computed it), both integers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

INTEGER_FIELDS = frozenset({"count", "part", "fence"})  # carried as float64 columns, sent as integers


def topic_for(signal: str, key: str | int) -> bytes:
    """The record topic ``{signal}.{key}``: subscribe to ``{signal}.`` or ``{signal}.{key}``."""
    return f"{signal}.{key}".encode()


def stat_values(name: str, column: np.ndarray) -> list[Any]:
    """A stat column as Python values with NaN turned into None (msgpack nil)."""
    if name in INTEGER_FIELDS:
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


def record_head(signal: str, key: str | int, n_stats: int) -> bytes:
    """The constant start of every record of one signal and key: map header, ``signal``, ``k``.

    Computed once per key lifetime, so a record costs only its numbers.
    """
    packer = msgpack.Packer()
    parts: list[bytes] = [packer.pack_map_header(4 + n_stats)]
    parts += [packer.pack(item) for item in ("signal", signal, "k", key)]
    return b"".join(parts)


def topics_for(signal: str, keys: Sequence[str | int]) -> list[bytes]:
    """:func:`topic_for` of many keys."""
    prefix = f"{signal}."
    return [(prefix + key if isinstance(key, str) else f"{prefix}{key}").encode() for key in keys]


def record_heads(signal: str, keys: Sequence[str | int], n_stats: int) -> list[bytes]:
    """:func:`record_head` of many keys: the constant part is packed once, then one key at a time."""
    packer = msgpack.Packer()
    prefix = packer.pack_map_header(4 + n_stats) + b"".join(packer.pack(item) for item in ("signal", signal, "k"))
    return [prefix + packed for packed in map(packer.pack, keys)]


@functools.lru_cache(maxsize=64)
def _fixed_tail_dtype(names: tuple[str, ...]) -> np.dtype:
    """Layout of ``t``, ``pub_ns`` and every stat when no value is nil: fixed-width msgpack."""
    fields: list[tuple[str, Any]] = [
        ("t_name", "S2"),
        ("t_tag", "u1"),
        ("t", ">i8"),
        ("pub_name", "S7"),
        ("pub_tag", "u1"),
        ("pub", ">i8"),
    ]
    for i, name in enumerate(names):
        fields += [
            (f"n{i}", f"S{len(msgpack.packb(name))}"),
            (f"g{i}", "u1"),
            (f"v{i}", ">u8" if name in INTEGER_FIELDS else ">f8"),
        ]
    return np.dtype(fields)


_VECTOR_ROWS = 16  # below this, building the structured array costs more than packing rows one by one


def _packed_payloads(
    heads: Sequence[bytes], t: np.ndarray, stats: dict[str, np.ndarray], pub_ns: int, rows: Sequence[int]
) -> list[bytes]:
    """Records for ``rows`` through the msgpack packer (nil-safe, any size)."""
    pack = msgpack.Packer().pack
    columns = {name: stat_values(name, column) for name, column in stats.items()}
    times = t.tolist()
    payloads = []
    for row in rows:
        fields = {"t": times[row], "pub_ns": pub_ns} | {name: values[row] for name, values in columns.items()}
        payloads.append(heads[row] + b"".join(pack(k) + pack(v) for k, v in fields.items()))
    return payloads


def encode_record_payloads(
    heads: Sequence[bytes], t: np.ndarray, stats: dict[str, np.ndarray], pub_ns: int
) -> list[bytes]:
    """One msgpack record per row: ``head + {"t", "pub_ns", <stat>...}``.

    Rows without undefined values (the common case) are laid out in one NumPy structured array
    as fixed-width msgpack (int64 times, uint64 count, float64 stats) and cut into records;
    rows with a nil go through the msgpack packer.
    """
    names = tuple(stats)
    rows = len(t)
    if rows < _VECTOR_ROWS:
        return _packed_payloads(heads, t, stats, pub_ns, range(rows))
    tail = np.zeros(rows, _fixed_tail_dtype(names))
    tail["t_name"], tail["t_tag"], tail["t"] = b"\xa1t", 0xD3, t
    tail["pub_name"], tail["pub_tag"], tail["pub"] = b"\xa6pub_ns", 0xD3, pub_ns
    undefined = np.zeros(rows, bool)
    for i, name in enumerate(names):
        column = stats[name]
        undefined |= np.isnan(column)
        tail[f"n{i}"] = msgpack.packb(name)
        if name in INTEGER_FIELDS:
            tail[f"g{i}"], tail[f"v{i}"] = 0xCF, np.nan_to_num(column).astype(np.uint64)
        else:
            tail[f"g{i}"], tail[f"v{i}"] = 0xCB, column
    raw = tail.tobytes()
    width = tail.dtype.itemsize
    payloads = [head + raw[o : o + width] for head, o in zip(heads, range(0, rows * width, width), strict=True)]
    if undefined.any():
        rows_with_nil = np.flatnonzero(undefined).tolist()
        for row, payload in zip(rows_with_nil, _packed_payloads(heads, t, stats, pub_ns, rows_with_nil), strict=True):
            payloads[row] = payload
    return payloads


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
