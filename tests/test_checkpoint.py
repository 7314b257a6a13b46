"""The checkpoint codec, engine export/restore, re-sharding, and the replay journal and filter (no sockets)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamd.checkpoint import Checkpoint, CheckpointError, decode, encode
from streamd.config import DEFAULT_SIGNALS, SignalSpec
from streamd.journal import JournalEntry, ReplayFilter, ReplayJournal
from streamd.persistence import checkpoint_path, load_for_worker, write_atomically
from streamd.sharding import shard_for
from streamd.transport import WorkerBatch
from streamd.windows import KERNEL, Engine, SignalResult

SPECS = (
    *DEFAULT_SIGNALS,
    SignalSpec("c7", "count", 7, ("count", "sum", "min", "max", "first", "vwap", "volume", "zscore")),
    SignalSpec("t50", "time", 50, ("count", "var", "last")),
)
NO_KERNEL = pytest.mark.skipif(KERNEL is None, reason="kernel not built")
PATHS = [pytest.param(False, id="numpy"), pytest.param(True, id="kernel", marks=NO_KERNEL)]
Batch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def batches(seed: int, count: int, keys: int, start: int = 0) -> list[Batch]:
    """Random batches with occasional late ticks, price jumps and zero quantities."""
    rng = np.random.default_rng(seed)
    out, t = [], start
    for _ in range(count):
        n = int(rng.integers(1, 300))
        slots = rng.integers(0, keys, n)
        times = t + np.sort(rng.integers(0, 40, n)) - rng.integers(0, 3, n)
        t += 30
        p = 100 + rng.normal(0, 1, n) * rng.choice([1.0, 1e3], n, p=[0.95, 0.05])
        out.append((slots, times, p, rng.integers(0, 3, n).astype(float)))
    return out


def assert_same(a: tuple[list[SignalResult], int], b: tuple[list[SignalResult], int]) -> None:
    assert a[1] == b[1]
    for x, y in zip(a[0], b[0], strict=True):
        np.testing.assert_array_equal(x.slots, y.slots)
        np.testing.assert_array_equal(x.t, y.t)
        for name in x.stats:
            np.testing.assert_array_equal(x.stats[name], y.stats[name])


def roundtrip(checkpoint: Checkpoint) -> Checkpoint:
    return decode(b"".join(bytes(piece) for piece in encode(checkpoint)))


def checkpoint_of(engine: Engine, keys: list[str | int], worker: int = 0, workers: int = 1) -> Checkpoint:
    return Checkpoint(worker, workers, "run", (7, 9), 1, 2, False, tuple(keys), engine.export_state())


@pytest.mark.parametrize("kernel", PATHS)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), before=st.integers(1, 25))
def test_restored_engine_continues_exactly_like_the_original(kernel: bool, seed: int, before: int) -> None:
    """Encode, decode and restore mid-stream: every later batch gives bit-identical rows and late counts."""
    stream = batches(seed, before + 15, keys=40)
    original = Engine(SPECS, use_kernel=kernel)
    for batch in stream[:before]:
        original.process(*batch)
    checkpoint = roundtrip(checkpoint_of(original, list(range(40))))
    restored = Engine(SPECS, use_kernel=kernel)
    assert restored.restore([(checkpoint.state, np.arange(40))]) == {}
    assert restored.n_keys == original.n_keys
    for batch in stream[before:]:
        assert_same(original.process(*batch), restored.process(*batch))


def test_header_round_trip() -> None:
    """Everything but the state arrays comes back as written; keys keep their types."""
    engine = Engine(SPECS)
    engine.process(*batches(1, 1, keys=3)[0])
    checkpoint = checkpoint_of(engine, ["a", 5, "é"], worker=1, workers=3)
    back = roundtrip(checkpoint)
    assert dataclasses.replace(back, state=checkpoint.state) == checkpoint
    assert [s.spec.name for s in back.state.signals] == [s.name for s in SPECS]


def test_resharding_merges_keys_of_several_workers_into_one_engine() -> None:
    """Two engines' keys re-sharded onto three: each new engine continues like one that saw all its keys' ticks."""
    keys = [f"K{i}" for i in range(60)]
    stream = batches(3, 40, keys=60)
    owned = [[k for k in range(60) if shard_for(keys[k], 2) == worker] for worker in range(2)]
    old = [Engine(SPECS), Engine(SPECS)]
    for slots, t, p, q in stream[:25]:
        for engine, mine in zip(old, owned, strict=True):
            ours = np.isin(slots, mine)
            engine.process(np.searchsorted(mine, slots[ours]), t[ours], p[ours], q[ours])
    sources = [
        roundtrip(checkpoint_of(engine, [keys[k] for k in mine], worker, 2))
        for worker, (engine, mine) in enumerate(zip(old, owned, strict=True))
    ]
    for worker in range(3):
        parts, names = [], []
        for source in sources:
            rows = np.array([i for i, k in enumerate(source.keys) if shard_for(k, 3) == worker], np.int64)
            parts.append((source.state, rows))
            names.extend(source.keys[i] for i in rows.tolist())
        engine = Engine(SPECS)
        assert engine.restore(parts) == {}
        index = {keys.index(str(name)): i for i, name in enumerate(names)}
        reference = Engine(SPECS)
        for number, (slots, t, p, q) in enumerate(stream):
            ours = np.isin(slots, list(index))
            local = np.array([index[s] for s in slots[ours].tolist()], np.int64)
            expected = reference.process(local, t[ours], p[ours], q[ours])
            if number >= 25:
                assert_same(expected, engine.process(local, t[ours], p[ours], q[ours]))


def test_a_changed_or_missing_signal_starts_empty_and_says_why() -> None:
    """Restore never adopts a window of another size or kind; new signals start empty."""
    engine = Engine(SPECS)
    engine.process(*batches(2, 1, keys=5)[0])
    state = roundtrip(checkpoint_of(engine, list(range(5)))).state
    changed = (SignalSpec("c7", "count", 8, ("count",)), SignalSpec("new", "time", 10, ("count",)), SPECS[0])
    restored = Engine(changed)
    empty = restored.restore([(state, np.arange(5))])
    assert set(empty) == {"c7", "new"}
    assert "window changed" in empty["c7"] and empty["new"] == "not in the checkpoint"
    result, _ = restored.process(np.array([0]), np.array([10**6]), np.array([1.0]), np.array([1.0]))
    assert result[0].stats["count"][0] == 1  # started empty


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:20], "too short"),
        (lambda b: b"XXXXXXXX" + b[8:], "bad magic"),
        (lambda b: b[:8] + (2).to_bytes(4, "little") + b[12:], "format version 2"),
        (lambda b: b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 1]) + b[len(b) // 2 + 1 :], "checksum mismatch"),
        (lambda b: b[:-10], "checksum mismatch"),
    ],
)
def test_damaged_files_are_errors_not_crashes(damage: object, message: str) -> None:
    """Truncation, another format, a flipped bit: a CheckpointError naming the problem."""
    engine = Engine(SPECS)
    engine.process(*batches(4, 2, keys=5)[0])
    blob = b"".join(bytes(piece) for piece in encode(checkpoint_of(engine, list(range(5)))))
    with pytest.raises(CheckpointError, match=message):
        decode(damage(blob))  # type: ignore[operator]


def test_loading_prefers_own_file_and_logs_a_bad_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Same worker count: its own file; the run decides whether sequence numbers carry over; garbage is logged."""
    engine = Engine(SPECS)
    engine.process(*batches(5, 3, keys=4)[0])
    checkpoint = checkpoint_of(engine, ["a", "b", "c", "d"], worker=0, workers=2)
    write_atomically(checkpoint_path(str(tmp_path), 0, 2), encode(checkpoint))
    log = logging.getLogger("test")
    same_run = load_for_worker(str(tmp_path), 0, 2, "run", log)
    assert same_run is not None and same_run.applied == (7, 9) and same_run.keys == ["a", "b", "c", "d"]
    other_run = load_for_worker(str(tmp_path), 0, 2, "another", log)
    assert other_run is not None and other_run.applied is None
    assert load_for_worker(str(tmp_path), 1, 2, "run", log) is None
    checkpoint_path(str(tmp_path), 1, 2).write_bytes(b"garbage")
    with caplog.at_level(logging.ERROR):
        assert load_for_worker(str(tmp_path), 1, 2, "run", log) is None
    assert "checkpoint not loaded" in caplog.text


def entry(seq: int, n: int) -> JournalEntry:
    t = np.arange(seq, seq + n, dtype=np.int64)
    return JournalEntry(seq, t % 3, t, t.astype(float), np.ones(n))


def test_journal_trims_to_the_checkpoint_and_evicts_beyond_its_bound() -> None:
    """Wholly checkpointed batches go; over the byte bound the oldest go and are counted."""
    journal = ReplayJournal(limit_bytes=32 * 100)
    assert journal.record(entry(0, 40)) == 0
    assert journal.record(entry(40, 40)) == 0
    journal.trim(30)
    assert journal.start == 0  # partly checkpointed: kept, the worker skips what it holds
    journal.trim(40)
    assert journal.start == 40
    assert journal.record(entry(80, 50)) == 0
    assert journal.record(entry(130, 30)) == 40
    assert journal.start == 80


def test_journal_replay_merges_contiguous_batches_into_chunks() -> None:
    """Replay covers every held tick once, in order, in chunks of at most ``chunk`` ticks."""
    journal = ReplayJournal(limit_bytes=1 << 20)
    for seq, n in ((0, 5), (5, 7), (12, 1), (13, 20)):
        journal.record(entry(seq, n))
    chunks = list(journal.replay(chunk=8))
    assert all(len(c.t) <= 8 for c in chunks) and len(chunks) < 7
    assert [c.seq for c in chunks] == np.cumsum([0] + [len(c.t) for c in chunks[:-1]]).tolist()
    np.testing.assert_array_equal(np.concatenate([c.t for c in chunks]), np.arange(33))


def batch_at(seq: int, n: int, ingest: int = 0) -> WorkerBatch:
    t = np.arange(seq, seq + n, dtype=np.int64)
    return WorkerBatch(t % 5, t, t.astype(float), np.ones(n), [], 0, ingest, 0, 1, seq)


def test_filter_skips_held_ticks_and_replays_applied_ones_quietly() -> None:
    """State holds < 10, the predecessor applied < 25: 10-24 quiet, 25+ new, per ingest."""
    replay = ReplayFilter([10, 0], [25, 3])
    out = replay.sort([batch_at(0, 20), batch_at(20, 10), batch_at(0, 5, ingest=1)], 0.0)
    assert [(b.seq_start, len(b.t)) for b in out.quiet] == [(10, 10), (20, 5), (0, 3)]
    assert [(b.seq_start, len(b.t)) for b in out.new] == [(25, 5), (3, 2)]
    np.testing.assert_array_equal(out.new[0].t, np.arange(25, 30))
    assert out.missing == 0
    assert (replay.applied(0), replay.applied(1)) == (30, 5)


def test_filter_reports_a_gap() -> None:
    """Ticks the journal no longer had are reported as missing, and the rest applied."""
    replay = ReplayFilter([10], [10])
    out = replay.sort([batch_at(14, 6)], 0.0)
    assert out.missing == 4 and [(b.seq_start, len(b.t)) for b in out.new] == [(14, 6)]


def test_a_batch_overtaken_by_later_ones_closes_its_gap_when_it_comes() -> None:
    """A replaced ingest's last batch, still in the old pipe, arrives after its successor's first:
    it is applied (not skipped as held), once, and only inside the gap it left."""
    replay = ReplayFilter([10], [10])
    assert replay.sort([batch_at(20, 5)], 0.0).missing == 10
    late = replay.sort([batch_at(10, 6), batch_at(16, 4)], 0.0)
    assert late.filled == 10 and [(b.seq_start, len(b.t)) for b in late.new] == [(10, 6), (16, 4)]
    again = replay.sort([batch_at(10, 6), batch_at(18, 5)], 0.0)
    assert again.filled == 0 and again.new == [] and again.quiet == []
    assert replay.applied(0) == 25


def test_a_gap_left_open_past_the_grace_is_counted_once_and_never_filled() -> None:
    """Batches a dead ingest handed over that never came are written off once: only what no
    predecessor counted (at or past ``quiet_upto``), and a straggler in the closed gap is skipped."""
    replay = ReplayFilter([10, 0], [14, 0])
    replay.sort([batch_at(20, 5), batch_at(3, 2, ingest=1)], 100.0)
    assert replay.write_off(104.0, grace=5.0) == 0
    replay.sort([batch_at(12, 2)], 104.5)  # overtaken, filled: [10, 12) and [14, 20) stay open
    assert replay.write_off(105.5, grace=5.0) == 6 + 3
    assert replay.write_off(200.0, grace=5.0) == 0
    straggler = replay.sort([batch_at(16, 2), batch_at(1, 1, ingest=1)], 201.0)
    assert straggler.new == [] and straggler.quiet == [] and straggler.filled == 0
    assert (replay.applied(0), replay.applied(1)) == (25, 5)
