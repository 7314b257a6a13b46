"""Pure wire functions: sharding, the ingest->worker transport, output records."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from streamd.records import encode_batch_record, encode_record_payloads, record_head, topic_for
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


finite = st.floats(allow_nan=False, allow_infinity=False)


@given(
    st.lists(
        st.tuples(keys, st.integers(0, 2**63 - 1), st.integers(0, 2**40), st.one_of(st.none(), finite), finite),
        min_size=1,
        max_size=30,
    )
)
def test_fast_record_layout_equals_plain_msgpack(rows: list[tuple[str | int, int, int, float | None, float]]) -> None:
    """The fixed-width fast path decodes to exactly what packing a dict would give."""
    keys_, times, counts, stds, means = zip(*rows, strict=True)
    stats = {
        "count": np.array(counts, float),
        "std": np.array([np.nan if s is None else s for s in stds]),
        "mean": np.array(means),
    }
    heads = [record_head("sig", key, 3) for key in keys_]
    payloads = encode_record_payloads(heads, np.array(times, np.int64), stats, 5)
    for key, time_ns, count, std, mean, payload in zip(keys_, times, counts, stds, means, payloads, strict=True):
        expected = {"signal": "sig", "k": key, "t": time_ns, "pub_ns": 5, "count": count, "std": std, "mean": mean}
        assert msgpack.unpackb(payload, strict_map_key=False) == expected


def test_batch_record_is_columnar() -> None:
    """Batch mode: one message per signal with arrays of keys, times and stats."""
    topic, payload = encode_batch_record("px", ["A", "B"], np.array([1, 2]), {"mean": np.array([1.0, np.nan])}, 5)
    assert topic == b"px"
    assert msgpack.unpackb(payload) == {"signal": "px", "pub_ns": 5, "k": ["A", "B"], "t": [1, 2], "mean": [1.0, None]}
