"""Pure wire functions: sharding, the ingest->worker transport, output records."""

from __future__ import annotations

import struct
import subprocess
import sys

import msgpack
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from streamd.config import WINDOW_STATS
from streamd.records import INTEGER_FIELDS, encode_batch_record, encode_record_payloads, record_head, topic_for
from streamd.sharding import shard_for
from streamd.transport import (
    EndOfInput,
    WorkerBatch,
    decode,
    decode_ack,
    encode_ack,
    encode_batch,
    encode_end_of_input,
)

PINNED_SHARDS = [6, 0, 5, 5, 4, 0]  # blake2b of the type-tagged key, mod 7, as released
keys = st.one_of(st.text(max_size=20), st.integers(min_value=-(2**63), max_value=2**63 - 1))


@given(keys, st.integers(1, 64))
def test_shard_is_in_range(key: str | int, workers: int) -> None:
    """Every key lands on one of the workers."""
    assert 0 <= shard_for(key, workers) < workers


def test_shard_is_pinned_across_releases() -> None:
    """Key placement is part of the contract (checkpoints, feeds sharded by it): these values never change."""
    assert [shard_for(k, 7) for k in ("AAPL", "MSFT", "ключ", 5, -1, 2**62)] == PINNED_SHARDS


def test_shard_is_stable_across_processes_and_types() -> None:
    """Another interpreter (another hash salt) computes the same shards; "5" and 5 are distinct keys."""
    sample = ["AAPL", "MSFT", "ключ", 5, -1, 2**62]
    code = f"from streamd.sharding import shard_for; print([shard_for(k, 7) for k in {sample!r}])"
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"}
    )
    assert other.stdout.strip() == str([shard_for(k, 7) for k in sample])
    assert {shard_for(f"K{i}", 4) for i in range(100)} == {0, 1, 2, 3}


def test_worker_batch_round_trips_exactly() -> None:
    """Columns, announced keys and accounting fields survive encode/decode bit for bit."""
    batch = WorkerBatch(
        slots=np.array([0, 1, 0]),
        t=np.array([2**62 + 1, 2**62 + 2, 2**62 + 3], np.int64),
        p=np.array([1.5, -2.25, 1e300]),
        q=np.array([0.0, 1.0, 2.0]),
        new_keys=[(0, "A"), (1, 2**40)],
        recv_ns=123,
        ingest=3,
        ingest_generation=2,
        generation=7,
        seq_start=456,
    )
    frames = [bytes(f) for f in encode_batch(batch)]
    back = decode(frames)
    assert isinstance(back, WorkerBatch)
    for name in ("slots", "t", "p", "q"):
        np.testing.assert_array_equal(getattr(back, name), getattr(batch, name))
    assert (back.new_keys, back.recv_ns, back.ingest, back.ingest_generation, back.generation, back.seq_start) == (
        batch.new_keys,
        123,
        3,
        2,
        7,
        456,
    )


def test_end_of_input_and_acks_round_trip() -> None:
    """End of input names its ingest; an ack names its worker and generation."""
    assert decode(encode_end_of_input(2)) == EndOfInput(2)
    assert decode_ack(encode_ack(5, 2**40)) == (5, 2**40)


def test_records_carry_topic_key_and_nil_for_undefined() -> None:
    """Record mode: topic signal.key, stats with NaN as nil and count as an integer."""
    assert topic_for("px", "A") == b"px.A" and topic_for("px", 7) == b"px.7"
    stats = {"count": np.array([1.0, 2.0]), "std": np.array([np.nan, 0.5])}
    heads = [record_head("px", "A", 2), record_head("px", 7, 2)]
    first, second = (msgpack.unpackb(p) for p in encode_record_payloads(heads, np.array([10, 20]), stats, 99))
    assert first == {"signal": "px", "k": "A", "t": 10, "pub_ns": 99, "count": 1, "std": None}
    assert second["k"] == 7 and second["std"] == 0.5 and isinstance(second["count"], int)


Row = tuple[str | int, int, list[float | None]]


@st.composite
def record_batches(draw: st.DrawFn, min_rows: int = 0) -> tuple[tuple[str, ...], list[Row]]:
    """Field names (stats, maybe ``part``/``fence``) and rows with nil anywhere, as a new key's first records have."""
    fields = st.sampled_from((*WINDOW_STATS, "part", "fence"))
    names = tuple(draw(st.lists(fields, min_size=1, max_size=6, unique=True)))
    number = st.floats(allow_nan=False, width=64)
    value = {name: st.integers(0, 2**53) if name in INTEGER_FIELDS else number for name in names}
    row = st.tuples(keys, st.integers(0, 2**63 - 1), st.tuples(*(st.one_of(st.none(), value[n]) for n in names)))
    rows = draw(st.lists(row, min_size=min_rows, max_size=min_rows + 40))
    return names, [(key, time_ns, list(values)) for key, time_ns, values in rows]


def encode_rows(names: tuple[str, ...], rows: list[Row], pub_ns: int) -> list[bytes]:
    """:func:`encode_record_payloads` of rows given as Python values (nil as NaN)."""
    stats = {n: np.array([np.nan if r[2][i] is None else r[2][i] for r in rows], float) for i, n in enumerate(names)}
    heads = [record_head("sig", key, len(names)) for key, _, _ in rows]
    return encode_record_payloads(heads, np.array([r[1] for r in rows], np.int64), stats, pub_ns)


def fixed_width_record(names: tuple[str, ...], row: Row, pub_ns: int) -> bytes:
    """One record packed field by field: int64 times, uint64 integer fields, float64 stats, nil as 0xc0."""
    key, time_ns, values = row
    parts = [record_head("sig", key, len(names)), msgpack.packb("t"), struct.pack(">Bq", 0xD3, time_ns)]
    parts += [msgpack.packb("pub_ns"), struct.pack(">Bq", 0xD3, pub_ns)]
    for name, v in zip(names, values, strict=True):
        if v is None:
            value = b"\xc0"
        else:
            value = struct.pack(">BQ", 0xCF, v) if name in INTEGER_FIELDS else struct.pack(">Bd", 0xCB, v)
        parts += [msgpack.packb(name), value]
    return b"".join(parts)


@given(record_batches(), st.integers(0, 2**62))
def test_records_decode_like_a_packed_dict(batch: tuple[tuple[str, ...], list[Row]], pub_ns: int) -> None:
    """Any batch size and nil pattern: each record decodes to the per-row dict, same field order and types."""
    names, rows = batch
    for row, payload in zip(rows, encode_rows(names, rows, pub_ns), strict=True):
        key, time_ns, values = row
        expected = {"signal": "sig", "k": key, "t": time_ns, "pub_ns": pub_ns} | dict(zip(names, values, strict=True))
        decoded = msgpack.unpackb(payload, strict_map_key=False)
        assert list(decoded.items()) == list(expected.items())
        assert [type(v) for v in decoded.values()] == [type(v) for v in expected.values()]


@given(record_batches(min_rows=16), st.integers(0, 2**62))
def test_vectorised_records_are_fixed_width_msgpack(batch: tuple[tuple[str, ...], list[Row]], pub_ns: int) -> None:
    """From 16 rows on, records with or without nils are byte for byte the fixed-width per-row packing."""
    names, rows = batch
    assert encode_rows(names, rows, pub_ns) == [fixed_width_record(names, row, pub_ns) for row in rows]


def test_batch_record_is_columnar() -> None:
    """Batch mode: one message per signal with arrays of keys, times and stats."""
    topic, payload = encode_batch_record("px", ["A", "B"], np.array([1, 2]), {"mean": np.array([1.0, np.nan])}, 5)
    assert topic == b"px"
    assert msgpack.unpackb(payload) == {"signal": "px", "pub_ns": 5, "k": ["A", "B"], "t": [1, 2], "mean": [1.0, None]}
