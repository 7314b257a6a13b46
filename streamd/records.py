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
    undefined = np.isnan(column)
    if name in INTEGER_FIELDS and not undefined.any():
        counts: list[Any] = column.astype(np.int64).tolist()
        return counts
    if not undefined.any():
        values: list[Any] = column.tolist()
        return values
    boxed = np.nan_to_num(column).astype(np.int64).astype(object) if name in INTEGER_FIELDS else column.astype(object)
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
    """Layout of ``t``, ``pub_ns`` and every stat as fixed-width msgpack (a nil keeps its 8 value bytes until cut)."""
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


@functools.lru_cache(maxsize=64)
def _value_offsets(names: tuple[str, ...]) -> np.ndarray:
    """Where each stat's 8 value bytes start inside a fixed-width tail."""
    fields = _fixed_tail_dtype(names).fields
    assert fields is not None
    return np.array([fields[f"v{i}"][1] for i in range(len(names))], np.intp)


_VECTOR_ROWS = 16  # below this, building the structured array costs more than packing rows one by one
_NIL = 0xC0


def _packed_payloads(heads: Sequence[bytes], t: np.ndarray, stats: dict[str, np.ndarray], pub_ns: int) -> list[bytes]:
    """Records through the msgpack packer (any size; minimal-width integers)."""
    pack = msgpack.Packer().pack
    columns = {name: stat_values(name, column) for name, column in stats.items()}
    payloads = []
    for row, (head, time_ns) in enumerate(zip(heads, t.tolist(), strict=True)):
        fields = {"t": time_ns, "pub_ns": pub_ns} | {name: values[row] for name, values in columns.items()}
        payloads.append(head + b"".join(pack(k) + pack(v) for k, v in fields.items()))
    return payloads


def _fixed_width_tails(t: np.ndarray, stats: dict[str, np.ndarray], pub_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row's ``t``, ``pub_ns`` and stats as fixed-width msgpack, and which values are undefined (stat x row).

    An undefined value gets the nil tag; its 8 value bytes are still there, to be cut out.
    """
    names = tuple(stats)
    tail = np.zeros(len(t), _fixed_tail_dtype(names))
    tail["t_name"], tail["t_tag"], tail["t"] = b"\xa1t", 0xD3, t
    tail["pub_name"], tail["pub_tag"], tail["pub"] = b"\xa6pub_ns", 0xD3, pub_ns
    # One contiguous row per stat: on NumPy 2.4, isnan into a strided bool view writes nothing.
    undefined = np.empty((len(names), len(t)), bool)
    for i, name in enumerate(names):
        column = stats[name]
        np.isnan(column, out=undefined[i])
        tag = 0xCF if name in INTEGER_FIELDS else 0xCB
        tail[f"n{i}"] = msgpack.packb(name)
        tail[f"g{i}"] = np.where(undefined[i], _NIL, tag) if undefined[i].any() else tag
        tail[f"v{i}"] = np.nan_to_num(column).astype(np.uint64) if name in INTEGER_FIELDS else column
    return tail, undefined


def _kept_byte_runs(nil_values: list[int], width: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` byte runs of a tail that remain once the 8 value bytes at ``nil_values`` go."""
    gone = sorted(nil_values)
    return list(zip([0, *(offset + 8 for offset in gone)], [*gone, width], strict=True))


def _records_by_nil_pattern(
    heads: Sequence[bytes], names: tuple[str, ...], tail: np.ndarray, undefined: np.ndarray
) -> list[bytes]:
    """Records when some values are nil: rows with the same nil fields share one fixed-width layout.

    Per pattern, the rows' tails are copied without the value bytes of their nil fields (the nil
    tag stays), which leaves them fixed-width again, to be cut into records like the all-valid case.
    A flood of new keys has one or two patterns (std, var and zscore are nil on a first tick).
    """
    rows, width = len(tail), tail.dtype.itemsize
    matrix = tail.view(np.uint8).reshape(rows, width)
    field_bits = 1 << np.arange(len(names), dtype=np.int64)  # a signal has at most 14 fields
    patterns, pattern_of_row = np.unique(field_bits @ undefined, return_inverse=True)
    value_bytes = _value_offsets(names)
    payloads = [b""] * rows
    for index, pattern in enumerate(patterns.tolist()):
        members = np.flatnonzero(pattern_of_row == index) if len(patterns) > 1 else np.arange(rows)
        group = matrix[members] if len(patterns) > 1 else matrix
        runs = _kept_byte_runs(value_bytes[np.flatnonzero(pattern & field_bits)].tolist(), width)
        raw = np.concatenate([group[:, start:stop] for start, stop in runs], axis=1).tobytes()
        size = sum(stop - start for start, stop in runs)
        for row, offset in zip(members.tolist(), range(0, len(members) * size, size), strict=True):
            payloads[row] = heads[row] + raw[offset : offset + size]
    return payloads


def encode_record_payloads(
    heads: Sequence[bytes], t: np.ndarray, stats: dict[str, np.ndarray], pub_ns: int
) -> list[bytes]:
    """One msgpack record per row: ``head + {"t", "pub_ns", <stat>...}``.

    All rows are laid out in one NumPy structured array as fixed-width msgpack (int64 times,
    uint64 count, float64 stats) and cut into records. A key's first records have undefined
    stats (the std of one tick), one-byte nils: those rows are grouped by which fields are nil
    (:func:`_records_by_nil_pattern`), which keeps a flood of new keys off the per-row packer.
    """
    rows = len(t)
    if rows < _VECTOR_ROWS:
        return _packed_payloads(heads, t, stats, pub_ns)
    tail, undefined = _fixed_width_tails(t, stats, pub_ns)
    if undefined.any():
        return _records_by_nil_pattern(heads, tuple(stats), tail, undefined)
    raw = tail.tobytes()
    width = tail.dtype.itemsize
    return [head + raw[o : o + width] for head, o in zip(heads, range(0, rows * width, width), strict=True)]


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
