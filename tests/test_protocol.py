"""Tests for the input protocol v1 decoder (``streamd.protocol``), without sockets."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamd.protocol import DecodedTicks, decode_payloads, encode_columnar_bin


def pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj)
    return packed


T0 = 1_700_000_000_000_000_000
msgpack_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # every integer msgpack can carry


def decode_one(obj: Any) -> DecodedTicks:
    return decode_payloads([pack(obj)])


def assert_accounting(result: DecodedTicks) -> None:
    assert result.received == len(result.keys) + sum(result.tick_drops.values())
    assert len(result.keys) == len(result.t) == len(result.p) == len(result.q)
    assert result.t.dtype == np.int64
    assert result.p.dtype == np.float64
    assert result.q.dtype == np.float64
    assert all(n > 0 for n in result.tick_drops.values())
    assert all(n > 0 for n in result.message_drops.values())
    assert set(result.examples) == set(result.tick_drops) | set(result.message_drops)


def ticks(result: DecodedTicks) -> list[tuple[Any, int, float, float]]:
    return list(zip(result.keys, result.t.tolist(), result.p.tolist(), result.q.tolist(), strict=True))


# --- shapes -----------------------------------------------------------------------------------


class TestShapes:
    def test_tick_map(self) -> None:
        """A single tick map decodes to one tick."""
        result = decode_one({"k": "AAPL", "t": T0, "p": 189.5, "q": 100.0})
        assert ticks(result) == [("AAPL", T0, 189.5, 100.0)]
        assert result.received == 1
        assert result.tick_drops == {} and result.message_drops == {} and result.examples == {}

    def test_tick_map_without_q_defaults_to_zero(self) -> None:
        """A tick map without q gets q = 0."""
        assert ticks(decode_one({"k": "A", "t": 1, "p": 2.0})) == [("A", 1, 2.0, 0.0)]

    def test_tick_map_nil_q_defaults_to_zero(self) -> None:
        """A nil q (JavaScript `undefined`) is treated as absent, q = 0."""
        assert ticks(decode_one({"k": "A", "t": 1, "p": 2.0, "q": None})) == [("A", 1, 2.0, 0.0)]

    def test_tick_map_extra_fields_ignored(self) -> None:
        """Unknown fields in a tick map are ignored."""
        assert ticks(decode_one({"k": "A", "t": 1, "p": 2.0, "src": "x", 5: 6})) == [("A", 1, 2.0, 0.0)]

    def test_tick_array_four_and_three(self) -> None:
        """Tick arrays of 4 elements and of 3 (q omitted) both decode."""
        result = decode_payloads([pack(["A", 1, 2.0, 3.0]), pack(["B", 2, 4.0])])
        assert ticks(result) == [("A", 1, 2.0, 3.0), ("B", 2, 4.0, 0.0)]

    def test_batch_of_maps_and_arrays(self) -> None:
        """A batch mixing tick maps and tick arrays keeps arrival order."""
        batch = [{"k": "A", "t": 1, "p": 1.0}, ["B", 2, 2.0, 5.0], {"k": 3, "t": 3, "p": 3.0, "q": 1}, ["D", 4, 4]]
        result = decode_one(batch)
        assert ticks(result) == [("A", 1, 1.0, 0.0), ("B", 2, 2.0, 5.0), (3, 3, 3.0, 1.0), ("D", 4, 4.0, 0.0)]

    def test_batch_of_arrays_only(self) -> None:
        """A batch of tick arrays with 3 and 4 elements decodes."""
        result = decode_one([["A", 1, 1.0], ["B", 2, 2.0, 2.0]])
        assert ticks(result) == [("A", 1, 1.0, 0.0), ("B", 2, 2.0, 2.0)]

    def test_empty_batch(self) -> None:
        """An empty batch is well formed and holds no ticks."""
        result = decode_one([])
        assert result.received == 0 and result.keys == [] and result.message_drops == {}

    def test_columnar_lists(self) -> None:
        """A columnar batch of plain lists decodes, q optional."""
        result = decode_one({"k": ["A", "B"], "t": [1, 2], "p": [1.5, 2], "x": "ignored"})
        assert ticks(result) == [("A", 1, 1.5, 0.0), ("B", 2, 2.0, 0.0)]

    def test_columnar_bin(self) -> None:
        """A columnar batch with little-endian bin columns decodes exactly."""
        payload = encode_columnar_bin(["A", 7], [T0, 2**62 + 1], [1.25, -3.0], [0.0, 10.0])
        assert ticks(decode_payloads([payload])) == [("A", T0, 1.25, 0.0), (7, 2**62 + 1, -3.0, 10.0)]

    def test_columnar_bin_wire_format(self) -> None:
        """The bin columns are raw little-endian int64 / float64 bytes."""
        decoded = msgpack.unpackb(encode_columnar_bin(["A"], [1], [2.0]))
        assert decoded == {"k": ["A"], "t": (1).to_bytes(8, "little"), "p": np.float64(2.0).tobytes()}
        assert np.frombuffer(decoded["p"], "<f8")[0] == 2.0

    def test_columnar_mixed_bin_and_list(self) -> None:
        """A columnar batch may mix bin and list columns."""
        t_bin = np.array([5, 6], dtype="<i8").tobytes()
        result = decode_one({"k": [1, 2], "t": t_bin, "p": [1, 2.5], "q": np.array([1.0, 0.5], "<f8").tobytes()})
        assert ticks(result) == [(1, 5, 1.0, 1.0), (2, 6, 2.5, 0.5)]

    def test_columnar_bin_arrays_are_writable(self) -> None:
        """Arrays decoded from bin columns are owned copies, not views of the payload."""
        result = decode_payloads([encode_columnar_bin(["A"], [1], [2.0], [3.0])])
        assert result.t.flags.writeable and result.p.flags.writeable and result.q.flags.writeable

    def test_mixed_payload_shapes_keep_order(self) -> None:
        """Payloads of every shape in one flush are decoded in arrival order."""
        payloads = [
            pack({"k": "m", "t": 1, "p": 1.0}),
            encode_columnar_bin(["c1", "c2"], [2, 3], [2.0, 3.0]),
            pack(["a", 4, 4.0]),
            pack({"k": ["l"], "t": [5], "p": [5.0]}),
            pack([["b", 6, 6.0]]),
        ]
        assert decode_payloads(payloads).keys == ["m", "c1", "c2", "a", "l", "b"]

    def test_no_payloads(self) -> None:
        """An empty flush gives empty columns."""
        result = decode_payloads([])
        assert result.keys == [] and result.received == 0 and len(result.t) == 0
        assert_accounting(result)


# --- values -----------------------------------------------------------------------------------


class TestValues:
    def test_big_int_time_exact(self) -> None:
        """Timestamps beyond 2**53 survive exactly (no float round trip)."""
        times = [2**62 + 1, 2**63 - 1, T0 + 123]
        for obj in ([{"k": "A", "t": t, "p": 1.0} for t in times], [["A", t, 1.0] for t in times]):
            assert decode_one(obj).t.tolist() == times
        assert decode_one({"k": ["A"] * 3, "t": times, "p": [1.0] * 3}).t.tolist() == times

    def test_int_keys_exact(self) -> None:
        """Integer keys up to the int64 limits are returned exactly as Python ints."""
        keys = [2**63 - 1, -(2**63), 2**53 + 1, 0]
        result = decode_one([[k, 1, 1.0] for k in keys])
        assert result.keys == keys
        assert all(type(k) is int for k in result.keys)

    def test_int_price_and_qty(self) -> None:
        """Integers are accepted for p and q (JavaScript sends whole numbers as ints)."""
        assert ticks(decode_one({"k": "A", "t": 1, "p": 100, "q": 3})) == [("A", 1, 100.0, 3.0)]
        assert ticks(decode_one({"k": ["A", "B"], "t": [1, 2], "p": [1, 2.5], "q": [0, 7]}))[1] == ("B", 2, 2.5, 7.0)

    def test_key_limits(self) -> None:
        """A key of exactly 256 UTF-8 bytes is accepted, including multi-byte characters."""
        keys = ["x" * 256, "é" * 128, "€" * 85 + "a", "", "日本"]
        assert decode_one([[k, 1, 1.0] for k in keys]).keys == keys

    def test_zero_time_and_negative_price(self) -> None:
        """t = 0, a negative price and q = 0 are valid."""
        assert ticks(decode_one(["A", 0, -1.5, 0])) == [("A", 0, -1.5, 0.0)]


# --- tick drops -------------------------------------------------------------------------------


def drops_of(obj: Any) -> dict[str, int]:
    result = decode_one(obj)
    assert_accounting(result)
    return result.tick_drops


class TestTickDrops:
    @pytest.mark.parametrize(
        "key",
        ["x" * 257, "é" * 129, "a\x00b", 2**63, 2**64 - 1, True, 1.5, None, b"bytes", ["A"], {"a": 1}],
    )
    def test_bad_key(self, key: Any) -> None:
        """Over-long, NUL-containing, out-of-range, bool, float, nil, bin and container keys are bad_key."""
        assert drops_of([[key, 1, 1.0], ["OK", 1, 1.0]]) == {"bad_key": 1}
        assert drops_of([{"k": key, "t": 1, "p": 1.0}]) == {"bad_key": 1}

    def test_bad_key_invalid_utf8(self) -> None:
        """A str key that is not valid UTF-8 drops only that tick."""
        payload = b"\x93\xa2\xff\xfe\x01\x01"  # ["\xff\xfe" as str, 1, 1]
        result = decode_payloads([payload, pack(["OK", 1, 1.0])])
        assert result.tick_drops == {"bad_key": 1} and result.keys == ["OK"]

    @pytest.mark.parametrize("t", [-1, 2**63, 2**64 - 1, 1.0, 1.5e18, "1", True, None, [1]])
    def test_bad_time(self, t: Any) -> None:
        """Negative, out-of-range, float, string, bool, nil and container times are bad_time."""
        assert drops_of([["A", t, 1.0], ["OK", 1, 1.0]]) == {"bad_time": 1}
        assert drops_of({"k": ["A", "B"], "t": [t, 1], "p": [1.0, 1.0]}) == {"bad_time": 1}

    def test_bad_time_msgpack_timestamp(self) -> None:
        """A msgpack Timestamp extension is not an integer time."""
        assert drops_of(["A", msgpack.Timestamp(1, 0), 1.0]) == {"bad_time": 1}

    @pytest.mark.parametrize("p", [float("nan"), float("inf"), -float("inf"), "abc", True, None, [1.0]])
    def test_bad_price(self, p: Any) -> None:
        """Non-finite, string, bool, nil and container prices are bad_price."""
        assert drops_of([["A", 1, p], ["OK", 1, 1.0]]) == {"bad_price": 1}
        assert drops_of({"k": ["A", "B"], "t": [1, 1], "p": [1.0, p]}) == {"bad_price": 1}

    @pytest.mark.parametrize("q", [-1, -0.5, float("nan"), float("inf"), "1", False, [1]])
    def test_bad_qty(self, q: Any) -> None:
        """Negative, non-finite, string, bool and container quantities are bad_qty."""
        assert drops_of([["A", 1, 1.0, q], ["OK", 1, 1.0, 1.0]]) == {"bad_qty": 1}
        assert drops_of({"k": ["A", "B"], "t": [1, 1], "p": [1.0, 1.0], "q": [1.0, q]}) == {"bad_qty": 1}

    def test_bad_values_in_bin_columns(self) -> None:
        """Negative times, NaN prices and negative quantities in bin columns are dropped by reason."""
        payload = encode_columnar_bin(["A", "B", "C", "D"], [-5, 1, 1, 1], [1.0, np.nan, 1.0, 1.0], [0, 0, -1, 0])
        result = decode_payloads([payload])
        assert result.tick_drops == {"bad_time": 1, "bad_price": 1, "bad_qty": 1}
        assert result.keys == ["D"]

    def test_first_failing_rule_wins(self) -> None:
        """A tick with several bad fields is counted once, under the first rule in k, t, p, q order."""
        batch = [[None, -1, "x", -1], ["A", -1, "x", -1], ["A", 1, "x", -1], ["A", 1, 1.0, -1]]
        assert drops_of(batch) == {"bad_key": 1, "bad_time": 1, "bad_price": 1, "bad_qty": 1}

    @pytest.mark.parametrize(
        "element",
        [5, "A", None, [], ["A", 1], ["A", 1, 1.0, 1.0, 9], {"k": "A", "t": 1}, {"t": 1, "p": 1.0}, {}],
    )
    def test_bad_tick(self, element: Any) -> None:
        """Batch elements that are not tick maps or 3-4 element tick arrays are bad_tick."""
        result = decode_one([["OK", 1, 1.0], element])
        assert result.tick_drops == {"bad_tick": 1} and result.keys == ["OK"]
        assert result.received == 2

    def test_single_bad_tick_payloads(self) -> None:
        """A lone tick map missing a field, or a lone short tick array, is one bad_tick."""
        result = decode_payloads([pack({"k": "A", "t": 1}), pack(["A", 1]), pack(["OK", 1, 1.0])])
        assert result.tick_drops == {"bad_tick": 2} and result.received == 3 and result.keys == ["OK"]

    def test_examples_are_short_and_name_the_value(self) -> None:
        """Each reason gets one short example naming the bad value and the key."""
        result = decode_one([{"k": "AAPL", "t": 1, "p": "abc"}, ["B", 1, 1.0, -2], {"k": "x" * 10_000, "t": 1, "p": 1}])
        assert result.examples["bad_price"] == "bad_price: p='abc' (key 'AAPL')"
        assert result.examples["bad_qty"] == "bad_qty: q=-2 (key 'B')"
        assert all(len(text) < 200 for text in result.examples.values())

    def test_mixed_key_types_valid(self) -> None:
        """A flush may mix str and int keys."""
        assert decode_one([["A", 1, 1.0], [2, 1, 1.0]]).keys == ["A", 2]


# --- message drops ----------------------------------------------------------------------------


class TestMessageDrops:
    @pytest.mark.parametrize(
        "payload",
        [b"", b"\xc1", b"\x93\x01", pack(["A", 1, 1.0]) + b"\x00", b"\x81\x91\x01\x02", b"\xdd\xff\xff\xff\xff"],
    )
    def test_malformed(self, payload: bytes) -> None:
        """Empty, invalid, truncated, trailing-data and unhashable-map-key payloads are malformed."""
        result = decode_payloads([pack(["A", 1, 1.0]), payload, pack(["B", 2, 2.0])])
        assert result.message_drops == {"malformed": 1}
        assert result.keys == ["A", "B"] and result.received == 2
        assert result.examples["malformed"].startswith("malformed: payload #1 ")

    @pytest.mark.parametrize(
        "obj",
        [
            "hello",
            5,
            None,
            1.5,
            b"bin",
            {"k": ["A", "B"], "t": [1], "p": [1.0, 2.0]},
            {"k": ["A"], "t": b"\x00" * 7, "p": [1.0]},
            {"k": ["A"], "t": b"\x00" * 16, "p": [1.0]},
            {"k": ["A"], "p": [1.0]},
            {"k": ["A"], "t": 1, "p": [1.0]},
            {"k": ["A"], "t": [1], "p": [1.0], "q": 5},
        ],
    )
    def test_bad_shape(self, obj: Any) -> None:
        """Scalars and columnar batches with missing, wrong-typed or unequal columns are bad_shape."""
        result = decode_payloads([pack(["A", 1, 1.0]), pack(obj)])
        assert result.message_drops == {"bad_shape": 1}
        assert result.keys == ["A"] and result.received == 1 and result.tick_drops == {}

    def test_example_names_original_payload_index(self) -> None:
        """The bad_shape example names the payload's index in the flush, even after a malformed one."""
        result = decode_payloads([b"\xc1", pack(["A", 1, 1.0]), pack("hello")])
        assert result.examples["bad_shape"] == "bad_shape: payload #2 is a str: 'hello'"

    def test_payload_with_two_objects_does_not_shift_others(self) -> None:
        """A payload holding two objects next to a truncated one cannot misattribute a valid payload."""
        two_objects = pack(1) + pack(2)
        array_of_one_header = b"\x91"
        valid = pack(["A", 1, 1.0])
        result = decode_payloads([two_objects, array_of_one_header, valid])
        assert result.message_drops == {"malformed": 2}
        assert result.keys == ["A"]


# --- encoder ----------------------------------------------------------------------------------


class TestEncoder:
    def test_rejects_float_times(self) -> None:
        """encode_columnar_bin refuses float timestamps, which would lose nanoseconds."""
        with pytest.raises(TypeError, match="integer"):
            encode_columnar_bin(["A"], np.array([1.0]), [1.0])

    def test_rejects_unequal_lengths(self) -> None:
        """encode_columnar_bin refuses columns of unequal length."""
        with pytest.raises(ValueError, match="equal lengths"):
            encode_columnar_bin(["A", "B"], [1], [1.0, 2.0])

    def test_accepts_numpy_inputs(self) -> None:
        """Numpy key and value arrays round-trip through the decoder."""
        keys = np.array([3, 4], dtype=np.int64)
        payload = encode_columnar_bin(keys, np.array([1, 2], dtype=np.uint32), np.array([1.0, 2.0]))
        assert ticks(decode_payloads([payload])) == [(3, 1, 1.0, 0.0), (4, 2, 2.0, 0.0)]


# --- properties -------------------------------------------------------------------------------

keys_st = st.one_of(
    st.text(max_size=70),
    msgpack_ints,
    st.just("x" * 257),
    st.booleans(),
    st.none(),
    st.floats(),
)
times_st = st.one_of(msgpack_ints, st.floats(), st.booleans(), st.text(max_size=3))
numbers_st = st.one_of(st.floats(), msgpack_ints, st.booleans(), st.none(), st.text(max_size=3))
valid_tick_st = st.tuples(
    st.one_of(st.text(max_size=20).filter(lambda s: "\x00" not in s), st.integers(-(2**63), 2**63 - 1)),
    st.integers(0, 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=0, allow_infinity=False),
)
any_tick_st = st.one_of(valid_tick_st, st.tuples(keys_st, times_st, numbers_st, numbers_st))


@st.composite
def tick_element(draw: st.DrawFn) -> Any:
    k, t, p, q = draw(any_tick_st)
    form = draw(st.sampled_from(["map", "map3", "arr", "arr3", "junk"]))
    if form == "map":
        return {"k": k, "t": t, "p": p, "q": q}
    if form == "map3":
        return {"k": k, "t": t, "p": p}
    if form == "arr":
        return [k, t, p, q]
    if form == "arr3":
        return [k, t, p]
    return draw(st.one_of(msgpack_ints, st.text(max_size=3), st.lists(msgpack_ints, max_size=6), st.just({"t": 1})))


@st.composite
def payload(draw: st.DrawFn) -> bytes:
    form = draw(st.sampled_from(["tick", "batch", "columnar", "bin", "garbage", "scalar"]))
    if form == "tick":
        return pack(draw(tick_element()))
    if form == "batch":
        return pack(draw(st.lists(tick_element(), max_size=6)))
    if form == "columnar":
        rows = draw(st.lists(any_tick_st, max_size=6))
        columns = {name: [row[i] for row in rows] for i, name in enumerate("ktpq")}
        if draw(st.booleans()) and rows:
            columns["t"] = columns["t"][:-1]
        return pack(columns)
    if form == "bin":
        rows = draw(st.lists(valid_tick_st, max_size=6))
        keys, times, prices, qtys = (list(col) for col in zip(*rows, strict=True)) if rows else ([], [], [], [])
        return encode_columnar_bin(keys, times, prices, qtys)
    if form == "garbage":
        return draw(st.binary(max_size=24))
    return pack(draw(st.one_of(st.text(max_size=4), msgpack_ints, st.none(), st.binary(max_size=4))))


class TestProperties:
    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=40), max_size=8))
    def test_garbage_never_raises(self, payloads: list[bytes]) -> None:
        """Random bytes never raise and always satisfy the accounting invariant."""
        assert_accounting(decode_payloads(payloads))

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(payload(), max_size=8))
    def test_accounting_on_mixes(self, payloads: list[bytes]) -> None:
        """On valid/invalid mixes, each payload is either dropped whole or counted tick by tick."""
        whole = decode_payloads(payloads)
        assert_accounting(whole)
        parts = [decode_payloads([p]) for p in payloads]
        for part in parts:
            assert_accounting(part)
            assert not (sum(part.message_drops.values()) and part.received), "a payload counted both ways"
            assert sum(part.message_drops.values()) <= 1
        assert whole.received == sum(part.received for part in parts)
        assert whole.keys == [k for part in parts for k in part.keys]
        assert whole.t.tolist() == [t for part in parts for t in part.t.tolist()]
        np.testing.assert_array_equal(whole.p, np.concatenate([np.empty(0)] + [part.p for part in parts]))
        for reason in set(whole.tick_drops) | {r for part in parts for r in part.tick_drops}:
            assert whole.tick_drops.get(reason, 0) == sum(part.tick_drops.get(reason, 0) for part in parts)
        assert sum(whole.message_drops.values()) == sum(sum(part.message_drops.values()) for part in parts)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(valid_tick_st, max_size=20), st.sampled_from(["maps", "arrays", "batch", "columnar", "bin"]))
    def test_valid_ticks_round_trip(self, rows: list[tuple[Any, int, float, float]], form: str) -> None:
        """Valid ticks come back exactly, whatever the shape they were sent in."""
        if form == "maps":
            payloads = [pack({"k": k, "t": t, "p": p, "q": q}) for k, t, p, q in rows]
        elif form == "arrays":
            payloads = [pack([k, t, p, q]) for k, t, p, q in rows]
        elif form == "batch":
            payloads = [pack([[k, t, p, q] for k, t, p, q in rows])]
        else:
            columns = [list(col) for col in zip(*rows, strict=True)] if rows else [[], [], [], []]
            columnar = encode_columnar_bin(*columns) if form == "bin" else pack(dict(zip("ktpq", columns, strict=True)))
            payloads = [columnar]
        result = decode_payloads(payloads)
        assert ticks(result) == [(k, t, float(p), float(q)) for k, t, p, q in rows]
        assert result.tick_drops == {} and result.message_drops == {}


# --- oracle -----------------------------------------------------------------------------------

UNPACK_OPTIONS: dict[str, Any] = {"raw": False, "strict_map_key": False, "unicode_errors": "surrogateescape"}


def reference_decode(payloads: list[bytes]) -> dict[str, Any]:
    """A per-payload, per-tick reading of docs/protocol.md: slow and plain, the oracle for the decoder."""
    out: dict[str, Any] = {"ticks": [], "received": 0, "tick_drops": {}, "message_drops": {}}

    def drop(kind: str, reason: str) -> None:
        out[kind][reason] = out[kind].get(reason, 0) + 1

    for payload in payloads:
        try:
            obj = msgpack.unpackb(payload, **UNPACK_OPTIONS)
        except Exception:
            drop("message_drops", "malformed")
            continue
        if type(obj) is dict and type(obj.get("k")) is list:
            rows = reference_columnar_rows(obj)
            if rows is None:
                drop("message_drops", "bad_shape")
                continue
            elements: list[Any] = rows
        elif type(obj) is dict:
            elements = [obj]
        elif type(obj) is list:
            elements = obj if obj and type(obj[0]) in (dict, list) else [obj] if obj else []
        else:
            drop("message_drops", "bad_shape")
            continue
        out["received"] += len(elements)
        for element in elements:
            reason, tick = reference_tick(element)
            if reason:
                drop("tick_drops", reason)
            else:
                out["ticks"].append(tick)
    return out


def reference_columnar_rows(obj: dict[Any, Any]) -> list[dict[str, Any]] | None:
    n = len(obj["k"])
    columns: dict[str, list[Any]] = {"k": obj["k"]}
    for name, wire in (("t", "<i8"), ("p", "<f8"), ("q", "<f8")):
        value = obj.get(name)
        if value is None and name == "q":
            columns[name] = [None] * n
        elif type(value) is list and len(value) == n:
            columns[name] = value
        elif type(value) is bytes and len(value) == 8 * n:
            columns[name] = np.frombuffer(value, wire).tolist()
        else:
            return None
    return [{name: columns[name][i] for name in "ktpq"} for i in range(n)]


def reference_tick(element: Any) -> tuple[str, tuple[Any, int, float, float] | None]:
    if type(element) is dict and all(f in element for f in "ktp"):
        k, t, p, q = element["k"], element["t"], element["p"], element.get("q")
    elif type(element) is list and len(element) in (3, 4):
        k, t, p, q = (*element, None) if len(element) == 3 else element
    else:
        return "bad_tick", None
    if not reference_key_ok(k):
        return "bad_key", None
    if not (type(t) is int and 0 <= t < 2**63):
        return "bad_time", None
    price = reference_number(p)
    if price is None:
        return "bad_price", None
    qty = 0.0 if q is None else reference_number(q)
    if qty is None or qty < 0:
        return "bad_qty", None
    return "", (k, t, price, qty)


def reference_key_ok(key: Any) -> bool:
    if type(key) is int:
        return -(2**63) <= key < 2**63
    if type(key) is not str or "\x00" in key:
        return False
    try:
        return len(key.encode()) <= 256
    except UnicodeEncodeError:
        return False


def reference_number(value: Any) -> float | None:
    if type(value) not in (int, float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


KEY_POOL = ["K0", "K1", "K2", "é", "", 1, 2, -(2**63), True, 1.0, None, "x" * 257, "a\x00"]


@st.composite
def wide_columnar(draw: st.DrawFn) -> bytes:
    """A columnar batch big enough for the column reader, mostly 9-byte numbers, with drawn defects."""
    n = draw(st.integers(120, 260))
    columns: dict[Any, Any] = {
        "k": [KEY_POOL[i % 3] for i in range(n)],
        "t": [T0 + i for i in range(n)],
        "p": [100.25 + i for i in range(n)],
        "q": [float(i % 5) for i in range(n)],
    }
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from("ktpq"))
        value = draw(
            {"k": st.sampled_from(KEY_POOL), "t": times_st, "p": numbers_st, "q": numbers_st}[name]
            | st.floats()
            | st.integers(2**63, 2**64 - 1)
            | st.integers(-(2**63), -(2**32))
        )
        columns[name][draw(st.integers(0, n - 1))] = value
    change = draw(st.sampled_from(["none", "none", "no_q", "short_t", "bin_t", "bin_p", "extra", "tail", "no_p"]))
    if change == "no_q":
        del columns["q"]
    elif change == "short_t":
        columns["t"] = columns["t"][:-1]
    elif change == "bin_t":
        columns["t"] = np.arange(T0, T0 + n, dtype="<i8").tobytes()
    elif change == "bin_p":
        columns["p"] = np.linspace(-1.0, 1.0, n).astype("<f8").tobytes()
    elif change == "extra":
        columns["x"] = [1, {"y": 2.5}]
    elif change == "no_p":
        del columns["p"]
    packed = pack(columns)
    return packed + b"\xc0" if change == "tail" else packed


class TestOracle:
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.lists(st.one_of(payload(), wide_columnar()), max_size=8),
        st.dictionaries(st.sampled_from(["K0", "K1", "é", "", 1, 2, -(2**63)]), st.integers(0, 2**40)),
    )
    def test_decoder_matches_reference(self, payloads: list[bytes], known: dict[Any, int]) -> None:
        """Random valid/invalid mixes decode and count exactly as the per-tick reference does."""
        result = decode_payloads(payloads, known)
        expected = reference_decode(payloads)
        assert_accounting(result)
        assert [(type(k), k, t, p, q) for k, t, p, q in ticks(result)] == [
            (type(k), k, t, p, q) for k, t, p, q in expected["ticks"]
        ]
        assert result.received == expected["received"]
        assert result.tick_drops == expected["tick_drops"]
        assert result.message_drops == expected["message_drops"]
        assert result.codes.tolist() == [known.get(k, -1) for k in result.keys]

    def test_known_int_key_is_not_found_by_bool_or_float(self) -> None:
        """True and 1.0 equal the int key 1 in a dict, yet are bad keys, not key 1."""
        result = decode_one({"k": [1, True, 1.0, "1"], "t": [1] * 4, "p": [1.0] * 4})
        assert result.keys == [1, "1"] and result.tick_drops == {"bad_key": 2}
        known_result = decode_payloads([pack({"k": [1, True, 1.0, "1"], "t": [1] * 4, "p": [1.0] * 4})], {1: 7})
        assert known_result.keys == [1, "1"] and known_result.tick_drops == {"bad_key": 2}
        assert known_result.codes.tolist() == [7, -1]

    def test_wide_columns_read_in_place_exactly(self) -> None:
        """A large list-column batch of 9-byte numbers decodes exactly, bad values dropped by reason."""
        n = 200
        t = [T0 + i for i in range(n)]
        t[3], t[5] = 2**64 - 1, -(2**40)
        p = [0.5 * i for i in range(n)]
        p[7] = float("nan")
        q = [1.0] * n
        q[9] = -1.0
        result = decode_payloads([pack({"k": [f"K{i}" for i in range(n)], "t": t, "p": p, "q": q})], {"K1": 3})
        assert result.tick_drops == {"bad_time": 2, "bad_price": 1, "bad_qty": 1}
        assert result.t.tolist() == [v for i, v in enumerate(t) if i not in (3, 5, 7, 9)]
        assert result.p.tolist() == [v for i, v in enumerate(p) if i not in (3, 5, 7, 9)]
        assert result.codes.tolist()[:2] == [-1, 3]
