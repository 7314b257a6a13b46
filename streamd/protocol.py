"""Input protocol v1: decode the msgpack payloads of one ingest flush into tick columns.

A pure codec with no I/O (see ``docs/protocol.md`` for the contract). :func:`decode_payloads`
runs on every ingest flush, so the well-formed paths do no per-tick Python bytecode:

* large columnar batches are read field by field, and a list column whose values all have
  msgpack's 9-byte form (every float64; every int at or above 2**32, such as a nanosecond
  time) is read in place by numpy, like a ``bin`` column, without one Python object per value;
* the other payloads are unpacked in one ``msgpack.unpackb`` call, columns are pulled out
  with C-level ``map``/``itemgetter``/``zip`` and validated with type sets and vectorised
  numpy checks;
* keys the caller already knows (the router's codes) are valid by construction: they are
  looked up once, and only unknown keys are checked against the key rule.

Per-element Python loops run only for columns that fail those checks (bad input).
"""

from __future__ import annotations

import math
import os
import reprlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, compress, repeat
from operator import is_, itemgetter
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_KEY_BYTES = 256

TICK_DROP_REASONS = ("bad_key", "bad_time", "bad_price", "bad_qty", "bad_tick")
MESSAGE_DROP_REASONS = ("malformed", "bad_shape")

_TIME_WIRE = np.dtype("<i8")
_FLOAT_WIRE = np.dtype("<f8")
_NUMBER_TYPES = frozenset({int, float})
_QTY_TYPES = frozenset({int, float, type(None)})
_CONTAINER_TYPES = frozenset({dict, list})
_KEY_TYPES = frozenset({str, int})
# A key of at most this many characters cannot exceed MAX_KEY_BYTES in UTF-8 (<= 4 bytes each).
_SHORT_KEY_CHARS = MAX_KEY_BYTES // 4

BoolArray = npt.NDArray[np.bool_]
Int64Array = npt.NDArray[np.int64]
Float64Array = npt.NDArray[np.float64]


@dataclass
class DecodedTicks:
    """The accepted ticks of one flush as columns, plus what was dropped and why."""

    keys: list[Any]  # str/int keys of the accepted ticks, in arrival order
    t: Int64Array
    p: Float64Array
    q: Float64Array
    received: int  # ticks seen in well-formed payloads (accepted + tick drops)
    tick_drops: dict[str, int]  # reason -> ticks dropped (only reasons with count > 0)
    message_drops: dict[str, int]  # reason -> whole payloads dropped
    examples: dict[str, str]  # reason -> one short example of why, for a rate-limited log line
    codes: Int64Array  # per accepted tick, its key's value in ``known`` (-1 where absent)


def decode_payloads(payloads: Sequence[bytes], known: Mapping[Any, int] | None = None) -> DecodedTicks:
    """Decode the payload frames of one flush; never raises on any payload content.

    ``known`` maps keys that passed the key rule before to non-negative codes (the router's
    ``KeyRouter.codes``); it must hold nothing else. Those keys are not checked again, and
    their codes come back in :attr:`DecodedTicks.codes`, so the router does not look them up
    a second time.
    """
    tally = _Tally()
    accepted = [_validate(raw, tally, known) for raw in _merged(_read_all(payloads, tally))]
    keys = accepted[0].keys if len(accepted) == 1 else list(chain.from_iterable(part.keys for part in accepted))
    return DecodedTicks(
        keys=keys,
        t=_concat([part.t for part in accepted], np.int64),
        p=_concat([part.p for part in accepted], np.float64),
        q=_concat([part.q for part in accepted], np.float64),
        received=tally.received,
        tick_drops={r: n for r, n in tally.tick_drops.items() if n > 0},
        message_drops={r: n for r, n in tally.message_drops.items() if n > 0},
        examples=tally.examples,
        codes=_concat([part.codes for part in accepted], np.int64),
    )


def encode_columnar_bin(
    keys: Iterable[str | int] | npt.NDArray[Any],
    t: Sequence[int] | npt.NDArray[np.integer[Any]],
    p: Sequence[float] | npt.ArrayLike,
    q: Sequence[float] | npt.ArrayLike | None = None,
) -> bytes:
    """Encode ticks as one columnar-batch payload with little-endian ``bin`` columns t, p, q.

    ``t`` must hold integers (never floats: nanosecond timestamps do not survive float64);
    ``q`` may be omitted (the decoder then uses 0).
    """
    key_list = keys.tolist() if isinstance(keys, np.ndarray) else list(keys)
    t_in = np.asarray(t)
    if t_in.size and t_in.dtype.kind not in "iu":
        msg = f"t must be integer nanoseconds, got dtype {t_in.dtype}"
        raise TypeError(msg)
    columns: dict[str, Any] = {
        "k": key_list,
        "t": t_in.astype(_TIME_WIRE).tobytes(),
        "p": np.asarray(p, dtype=_FLOAT_WIRE).tobytes(),
    }
    if q is not None:
        columns["q"] = np.asarray(q, dtype=_FLOAT_WIRE).tobytes()
    n = len(key_list)
    lengths = {name: len(col) // 8 for name, col in columns.items() if name != "k"}
    if any(length != n for length in lengths.values()):
        msg = f"columns must have equal lengths: k={n}, " + ", ".join(f"{c}={m}" for c, m in lengths.items())
        raise ValueError(msg)
    packed: bytes = msgpack.packb(columns)
    return packed


# --- accounting -------------------------------------------------------------------------------


class _ExampleRepr(reprlib.Repr):
    """A ``repr`` that stays short and cheap on huge strings, byte strings and containers."""

    def __init__(self) -> None:
        super().__init__()
        self.maxstring = 40
        self.maxother = 40
        self.maxlist = 4
        self.maxdict = 4
        self.maxlevel = 2

    def repr_bytes(self, x: bytes, level: int) -> str:
        if len(x) <= 16:
            return repr(x)
        return f"{x[:16]!r}... ({len(x)} bytes)"


_short = _ExampleRepr().repr


@dataclass
class _Tally:
    """Counts and first examples of one :func:`decode_payloads` call."""

    received: int = 0
    tick_drops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TICK_DROP_REASONS, 0))
    message_drops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MESSAGE_DROP_REASONS, 0))
    examples: dict[str, str] = field(default_factory=dict)

    def wants_example(self, reason: str) -> bool:
        return reason not in self.examples

    def drop_message(self, reason: str, why: str) -> None:
        self.message_drops[reason] += 1
        if reason not in self.examples:
            self.examples[reason] = f"{reason}: {why}"

    def drop_ticks(self, reason: str, count: int, why: str) -> None:
        self.tick_drops[reason] += count
        if reason not in self.examples:
            self.examples[reason] = f"{reason}: {why}"


# --- unpacking --------------------------------------------------------------------------------

# A payload this large is worth one reader of its own if it is a columnar batch: about 40 ticks.
_COLUMNAR_MIN_BYTES = 1024
_MAP_HEADS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
_NUMBER_COLUMNS = frozenset({"t", "p", "q"})
# msgpack's 9-byte numbers: 0xcb float 64, 0xcf uint 64, 0xd3 int 64 (type byte, then big-endian).
_WIDE_FLOAT, _WIDE_UINT, _WIDE_INT = 0xCB, 0xCF, 0xD3


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, unicode_errors="surrogateescape")


def _read_all(payloads: Sequence[bytes], tally: _Tally) -> list[_RawColumns]:
    """Sort the payloads of a flush into runs of ticks, in arrival order.

    Large columnar batches are read on their own (:func:`_read_columnar`); the runs of other
    payloads between them are unpacked together.
    """
    segments: list[_RawColumns] = []
    start = 0
    sizes = np.array(list(map(len, payloads)), dtype=np.int64)  # twice as fast as np.fromiter here
    for index in np.flatnonzero(sizes >= _COLUMNAR_MIN_BYTES).tolist():
        obj = _read_columnar(payloads[index])
        if obj is None:
            continue
        segments += _unpacked_segments(payloads[start:index], start, tally)
        columnar = _columnar(obj, index, tally)
        if columnar is not None:
            segments.append(columnar)
        start = index + 1
    segments += _unpacked_segments(payloads[start:], start, tally)
    return segments


def _merged(segments: list[_RawColumns]) -> list[_RawColumns]:
    """Adjacent runs whose number columns are all arrays, joined: numpy's cost per call is paid per flush."""
    merged: list[_RawColumns] = []
    group: list[_RawColumns] = []
    for raw in segments:
        if type(raw.t) is np.ndarray and type(raw.p) is np.ndarray and type(raw.q) is np.ndarray:
            group.append(raw)
        else:
            merged += _joined(group)
            group = []
            merged.append(raw)
    return merged + _joined(group)


def _joined(group: list[_RawColumns]) -> list[_RawColumns]:
    if len(group) <= 1:
        return group
    return [
        _RawColumns(
            list(chain.from_iterable(raw.k for raw in group)),
            np.concatenate([raw.t for raw in group]),
            np.concatenate([raw.p for raw in group]),
            np.concatenate([raw.q for raw in group]),
        )
    ]


def _unpacked_segments(payloads: Sequence[bytes], first: int, tally: _Tally) -> list[_RawColumns]:
    """Unpack and sort a run of payloads; ``first`` is the flush index of the run's first one."""
    if not payloads:
        return []
    objs, origin = _unpack_all(payloads, first, tally)
    return _segments(objs, origin or range(first, first + len(objs)), tally)


def _read_columnar(payload: bytes) -> dict[Any, Any] | None:
    """A map payload read field by field, with its 9-byte number columns as numpy arrays.

    Returns the map ``unpackb`` would return, except that a ``t`` column of 9-byte ints or a
    ``p``/``q`` column of 9-byte floats is already an int64/float64 array. Returns None if the
    payload is not a map whose ``"k"`` is an array, or not exactly one valid msgpack object:
    the payload then takes the general path, which finds out what it is.
    """
    if payload[0] not in _MAP_HEADS:
        return None
    reader = msgpack.Unpacker(
        raw=False, strict_map_key=False, unicode_errors="surrogateescape", max_buffer_size=len(payload)
    )
    obj: dict[Any, Any] = {}
    try:
        reader.feed(payload)
        for _ in range(reader.read_map_header()):
            name = reader.unpack()
            column = _wide_number_column(payload, reader.tell(), name) if name in _NUMBER_COLUMNS else None
            if column is None:
                obj[name] = reader.unpack()
            else:
                obj[name], size = column
                reader.read_bytes(size)
        whole = reader.tell() == len(payload)
    except Exception:  # whatever msgpack raises on a bad payload, the general path counts it
        return None
    return obj if whole and type(obj.get("k")) is list else None


def _wide_number_column(payload: bytes, at: int, name: str) -> tuple[npt.NDArray[Any], int] | None:
    """The array at ``payload[at:]`` as int64 (``t``) or float64 values, if all are 9-byte numbers.

    Returns the values and the array's size in bytes, or None if it is not such an array.
    In a ``t`` column a uint 64 at or above 2**63 reads as negative: invalid, as it should be.
    """
    head = payload[at]
    if head & 0xF0 == 0x90:
        n, body = head & 0x0F, at + 1
    elif head == 0xDC:
        n, body = int.from_bytes(payload[at + 1 : at + 3], "big"), at + 3
    elif head == 0xDD:
        n, body = int.from_bytes(payload[at + 1 : at + 5], "big"), at + 5
    else:
        return None
    end = body + 9 * n
    if n == 0 or end > len(payload):
        return None
    tags = payload[body:end:9]
    wide = tags.count(_WIDE_UINT) + tags.count(_WIDE_INT) if name == "t" else tags.count(_WIDE_FLOAT)
    if wide != n:
        return None
    wire = _TIME_WIRE if name == "t" else _FLOAT_WIRE
    values = np.ndarray(n, dtype=wire.newbyteorder(">"), buffer=payload, offset=body + 1, strides=(9,))
    return values.astype(wire.newbyteorder("=")), end - at


def _unpack_all(payloads: Sequence[bytes], first: int, tally: _Tally) -> tuple[list[Any], list[int] | None]:
    """Unpack every payload; malformed ones are counted and left out.

    Returns the objects and, if some payloads were left out, each object's flush index
    (``first`` is the flush index of ``payloads[0]``).

    Fast path: one ``unpackb`` of ``[P1, M, P2, M, ..., Pn, M]`` where ``M`` is a random 64-bit
    integer drawn per call. The parse succeeds with ``M`` at every odd position only if each
    ``Pi`` is exactly one msgpack object: a truncated payload would swallow a marker, one with
    trailing data would shift them, and a payload cannot forge a marker it does not know.
    Anything else falls back to unpacking each payload alone.
    """
    n = len(payloads)
    if n == 0:
        return [], None
    nonce = os.urandom(8)
    marker = b"\xcf" + nonce
    try:
        joined = b"".join((b"\xdd", (2 * n).to_bytes(4, "big"), marker.join(payloads), marker))
        objs: list[Any] = _unpack(joined)
        if objs[1::2].count(int.from_bytes(nonce, "big")) == n:
            return objs[0::2], None
    except Exception:  # whatever msgpack raises on garbage, the one-by-one pass below finds it
        pass
    good: list[Any] = []
    origin: list[int] = []
    for index, payload in enumerate(payloads, start=first):
        try:
            good.append(_unpack(payload))
            origin.append(index)
        except Exception as exc:  # any payload content must be counted, never raised
            if tally.wants_example("malformed"):
                why = f"payload #{index} {_short(bytes(payload))} is not one msgpack object ({type(exc).__name__})"
            else:
                why = ""
            tally.drop_message("malformed", why)
    return good, origin


# --- shapes -----------------------------------------------------------------------------------


@dataclass
class _RawColumns:
    """One run of ticks in arrival order, before value validation.

    ``t``/``p``/``q`` are lists of unpacked objects, or numpy arrays from ``bin`` columns.
    In ``q``, ``None`` means "absent" (0).
    """

    k: Sequence[Any]
    t: Sequence[Any] | Int64Array
    p: Sequence[Any] | Float64Array
    q: Sequence[Any] | Float64Array


def _segments(objs: list[Any], origin: Sequence[int], tally: _Tally) -> list[_RawColumns]:
    """Sort unpacked payloads into runs of tick elements and columnar batches, in order."""
    kinds = set(map(type, objs))
    if kinds == {dict}:
        try:
            keys = list(map(itemgetter("k"), objs))
        except KeyError:
            keys = None
        if keys is not None and list not in set(map(type, keys)):
            return _tick_segment(objs, tally, keys)
    elif kinds == {list}:
        try:
            heads = set(map(type, map(itemgetter(0), objs)))
        except IndexError:
            heads = None
        if heads is not None:
            if not heads & _CONTAINER_TYPES:
                return _tick_segment(objs, tally)
            if heads <= _CONTAINER_TYPES:
                return _tick_segment(list(chain.from_iterable(objs)), tally)
    return _segments_one_by_one(objs, origin, tally)


def _segments_one_by_one(objs: list[Any], origin: Sequence[int], tally: _Tally) -> list[_RawColumns]:
    """Classify payloads of mixed shapes one at a time (one Python step per payload)."""
    segments: list[_RawColumns] = []
    pending: list[Any] = []
    for index, obj in zip(origin, objs, strict=True):
        kind = type(obj)
        if kind is dict and type(obj.get("k")) is list:
            segments.extend(_tick_segment(pending, tally))
            pending = []
            columnar = _columnar(obj, index, tally)
            if columnar is not None:
                segments.append(columnar)
        elif kind is dict:
            pending.append(obj)
        elif kind is list:
            if obj and type(obj[0]) in _CONTAINER_TYPES:
                pending.extend(obj)
            elif obj:
                pending.append(obj)
        else:
            tally.drop_message("bad_shape", f"payload #{index} is a {kind.__name__}: {_short(obj)}")
    segments.extend(_tick_segment(pending, tally))
    return segments


def _columnar(obj: dict[Any, Any], index: int, tally: _Tally) -> _RawColumns | None:
    """Check a columnar batch's column types and lengths; count it as bad_shape if wrong."""
    k: list[Any] = obj["k"]
    n = len(k)
    columns: dict[str, Any] = {}
    for name, wire in (("t", _TIME_WIRE), ("p", _FLOAT_WIRE), ("q", _FLOAT_WIRE)):
        value = obj.get(name)
        if value is None and name == "q":
            columns[name] = np.zeros(n)
        elif (type(value) is list or type(value) is np.ndarray) and len(value) == n:
            columns[name] = value
        elif type(value) is bytes and len(value) == 8 * n:
            columns[name] = np.frombuffer(value, dtype=wire).astype(wire.newbyteorder("="))
        else:
            if type(value) is list or type(value) is np.ndarray:
                got = f"{len(value)} values"
            elif type(value) is bytes:
                got = f"{len(value)} bytes"
            else:
                got = f"a {type(value).__name__}"
            why = f"payload #{index}: columnar batch has {n} keys but column {name!r} is {got}"
            tally.drop_message("bad_shape", why)
            return None
    tally.received += n
    return _RawColumns(k, columns["t"], columns["p"], columns["q"])


def _tick_segment(elements: list[Any], tally: _Tally, keys: list[Any] | None = None) -> list[_RawColumns]:
    """Turn a list of tick maps / tick arrays into raw columns (``[]`` if there are none).

    ``keys``, if given, is the already extracted ``"k"`` column of an all-map list.
    """
    if not elements:
        return []
    tally.received += len(elements)
    kinds = set(map(type, elements))
    if kinds == {dict}:
        try:
            k = keys if keys is not None else list(map(itemgetter("k"), elements))
            t = list(map(itemgetter("t"), elements))
            p = list(map(itemgetter("p"), elements))
        except KeyError:
            return _tick_segment_slow(elements, tally)
        q = list(map(dict.get, elements, repeat("q")))
        return [_RawColumns(k, t, p, q)]
    if kinds == {list} and set(map(len, elements)) <= {3, 4}:
        # Pad 3-element arrays with an absent q, at C speed, so that zip() can transpose.
        short = compress(elements, map((3).__eq__, map(len, elements)))
        for _ in map(list.append, short, repeat(None)):
            pass
        k_col, t_col, p_col, q_col = zip(*elements, strict=True)
        return [_RawColumns(k_col, t_col, p_col, q_col)]
    return _tick_segment_slow(elements, tally)


def _tick_segment_slow(elements: list[Any], tally: _Tally) -> list[_RawColumns]:
    """Per-element shape check of a tick list that holds at least one non-tick (bad input)."""
    k: list[Any] = []
    t: list[Any] = []
    p: list[Any] = []
    q: list[Any] = []
    for element in elements:
        kind = type(element)
        if kind is dict and "k" in element and "t" in element and "p" in element:
            k.append(element["k"])
            t.append(element["t"])
            p.append(element["p"])
            q.append(element.get("q"))
        elif kind is list and 3 <= len(element) <= 4:
            k.append(element[0])
            t.append(element[1])
            p.append(element[2])
            q.append(element[3] if len(element) == 4 else None)
        else:
            if kind is dict:
                missing = ", ".join(repr(f) for f in ("k", "t", "p") if f not in element)
                why = f"tick map {_short(element)} lacks {missing}"
            elif kind is list:
                why = f"tick array {_short(element)} has {len(element)} elements, not 3 or 4"
            else:
                why = f"batch element {_short(element)} is neither a tick map nor a tick array"
            tally.drop_ticks("bad_tick", 1, why)
    return [_RawColumns(k, t, p, q)] if k else []


# --- values -----------------------------------------------------------------------------------


@dataclass
class _Accepted:
    """The accepted ticks of one run, and their keys' known codes (-1 for keys not known)."""

    keys: list[Any]
    codes: Int64Array
    t: Int64Array
    p: Float64Array
    q: Float64Array


def _validate(raw: _RawColumns, tally: _Tally, known: Mapping[Any, int] | None) -> _Accepted:
    """Check every value of a run of ticks; count the bad ones under their first failing rule."""
    codes, key_ok = _key_codes(raw.k, known)
    t, t_ok = _time_column(raw.t)
    p, p_ok = _number_column(raw.p, nonnegative=False)
    q, q_ok = _number_column(raw.q, nonnegative=True)
    ok = key_ok & t_ok & p_ok & q_ok
    if ok.all():
        return _Accepted(list(raw.k), codes, t, p, q)
    pending = np.ones(len(ok), dtype=bool)
    for reason, field_ok, name, column in (
        ("bad_key", key_ok, "k", raw.k),
        ("bad_time", t_ok, "t", raw.t),
        ("bad_price", p_ok, "p", raw.p),
        ("bad_qty", q_ok, "q", raw.q),
    ):
        failing = pending & ~field_ok
        count = int(np.count_nonzero(failing))
        if count:
            first = int(np.argmax(failing))
            why = f"{name}={_short(_plain(column[first]))}"
            if name != "k":
                why += f" (key {_short(_plain(raw.k[first]))})"
            tally.drop_ticks(reason, count, why)
            pending &= field_ok
    keep = ok.tolist()
    return _Accepted(list(compress(raw.k, keep)), codes[ok], t[ok], p[ok], q[ok])


def _key_codes(keys: Sequence[Any], known: Mapping[Any, int] | None) -> tuple[Int64Array, BoolArray]:
    """Each key's code in ``known`` (-1 where absent) and where the key is valid.

    A key found in ``known`` is valid, if it has the type it was stored with: ``True`` and
    ``1.0`` find the entry of the int key ``1``. All-str key columns (the common case) are
    told by one ``"".join``; other columns pay for a type per key.
    """
    n = len(keys)
    if not known:
        return np.full(n, -1, dtype=np.int64), _key_mask(keys)
    codes = _known_codes(keys, known)
    if not _all_str(keys) and not set(map(type, keys)) <= _KEY_TYPES:
        codes[~np.fromiter(map(_KEY_TYPES.__contains__, map(type, keys)), dtype=bool, count=n)] = -1
    unknown = codes < 0
    if not unknown.any():
        return codes, np.ones(n, dtype=bool)
    key_ok = ~unknown
    key_ok[unknown] = _key_mask(list(compress(keys, unknown.tolist())))
    return codes, key_ok


def _known_codes(keys: Sequence[Any], known: Mapping[Any, int]) -> Int64Array:
    try:
        return np.fromiter(map(known.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))
    except TypeError:  # an unhashable key (an array or a map): bad input
        return np.fromiter(map(_known_code, keys, repeat(known)), dtype=np.int64, count=len(keys))


def _known_code(key: Any, known: Mapping[Any, int]) -> int:
    try:
        return known.get(key, -1)
    except TypeError:
        return -1


def _all_str(keys: Sequence[Any]) -> bool:
    try:
        "".join(keys)
    except TypeError:
        return False
    return True


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it stands for (for examples)."""
    return value.item() if isinstance(value, np.generic) else value


def _key_mask(keys: Sequence[Any]) -> BoolArray:
    """True where the key is a valid str (<= 256 UTF-8 bytes, no NUL) or int64 key."""
    n = len(keys)
    kinds = set(map(type, keys))
    if n == 0 or (kinds == {str} and _all_str_keys_valid(keys)) or (kinds == {int} and _all_int64(keys)):
        return np.ones(n, dtype=bool)
    return np.fromiter(map(_is_valid_key, keys), dtype=bool, count=n)


def _all_str_keys_valid(keys: Sequence[str]) -> bool:
    joined = "".join(keys)
    if "\x00" in joined:
        return False
    longest = max(map(len, keys))
    if joined.isascii():
        return longest <= MAX_KEY_BYTES
    try:
        joined.encode()  # fails on lone surrogates (invalid UTF-8 on the wire)
    except UnicodeEncodeError:
        return False
    return longest <= _SHORT_KEY_CHARS or max(map(len, map(str.encode, keys))) <= MAX_KEY_BYTES


def _all_int64(values: Sequence[int]) -> bool:
    return min(values) >= INT64_MIN and max(values) <= INT64_MAX


def _is_valid_key(key: Any) -> bool:
    if type(key) is int:
        return INT64_MIN <= key <= INT64_MAX
    if type(key) is not str or "\x00" in key:
        return False
    try:
        return len(key.encode()) <= MAX_KEY_BYTES
    except UnicodeEncodeError:
        return False


def _time_column(column: Sequence[Any] | Int64Array) -> tuple[Int64Array, BoolArray]:
    """Timestamps as int64 and where they are valid (int, 0 <= t < 2**63); exact, no floats."""
    if isinstance(column, np.ndarray):
        return column, column >= 0
    values = None
    if set(map(type, column)) <= {int}:
        try:
            values = np.array(column, dtype=np.int64)
        except OverflowError:
            values = None
    if values is None:
        values = np.array(list(map(_time_or_minus_one, column)), dtype=np.int64)
    return values, values >= 0


def _time_or_minus_one(value: Any) -> int:
    return value if type(value) is int and 0 <= value <= INT64_MAX else -1


def _number_column(column: Sequence[Any] | Float64Array, *, nonnegative: bool) -> tuple[Float64Array, BoolArray]:
    """Numbers as float64 and where they are valid (finite; ``>= 0`` for quantities).

    ``None`` (an absent quantity) reads as 0; booleans and other types are invalid.
    """
    values = column if isinstance(column, np.ndarray) else _float_values(column, nonnegative=nonnegative)
    ok = np.isfinite(values)
    if nonnegative:
        with np.errstate(invalid="ignore"):
            ok &= values >= 0
    return values, ok


def _float_values(column: Sequence[Any], *, nonnegative: bool) -> Float64Array:
    kinds = set(map(type, column))
    if kinds <= (_QTY_TYPES if nonnegative else _NUMBER_TYPES):
        try:
            values = np.array(column, dtype=np.float64)
        except OverflowError:
            pass
        else:
            if type(None) in kinds:
                values[np.fromiter(map(is_, column, repeat(None)), dtype=bool, count=len(column))] = 0.0
            return values
    as_float = _quantity_or_nan if nonnegative else _number_or_nan
    return np.array(list(map(as_float, column)), dtype=np.float64)


def _quantity_or_nan(value: Any) -> float:
    return 0.0 if value is None else _number_or_nan(value)


def _number_or_nan(value: Any) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            return math.nan
    return math.nan


def _concat(parts: list[npt.NDArray[Any]], dtype: type[np.generic]) -> npt.NDArray[Any]:
    if len(parts) == 1:
        return parts[0].astype(dtype, copy=False)
    if not parts:
        return np.empty(0, dtype=dtype)
    return np.concatenate(parts).astype(dtype, copy=False)
