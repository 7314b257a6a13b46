"""Bounded per-key state in the real daemon: silent keys are evicted everywhere, new keys are capped."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path

import msgpack
import numpy as np
import pytest

from streamd.protocol import encode_columnar_bin
from tests.helpers import Daemon, Subscriber, accounting, feed, running_daemon

COUNT_SIGNAL = """
[[signal]]
name = "c"
window = "count"
size = 1000
stats = ["count", "last"]
[[signal]]
name = "held"
window = "count"
size = 1000
stats = ["count"]
emit_interval = "10s"
"""


def ticks_of(keys: list[str], price: float = 1.0) -> bytes:
    now = time.time_ns()
    return msgpack.packb([[key, now + i, price] for i, key in enumerate(keys)])


def keep_ticking(daemon: Daemon, keys: list[str], stop: threading.Event, sent: dict[str, int]) -> None:
    """Live keys: one tick each every 20 ms until ``stop``."""
    while not stop.is_set():
        feed(daemon.ingest, [ticks_of(keys)])
        for key in keys:
            sent[key] += 1
        time.sleep(0.02)


def test_silent_keys_are_evicted_and_come_back_empty(tmp_path: Path) -> None:
    """key_ttl = 300ms: silent keys leave every table (metric), a returning key counts from 1, live keys go on.

    Rows an ``emit_interval`` still held for an evicted key are published when it is evicted.
    """
    state = '[state]\nkey_ttl = "300ms"\n'
    with running_daemon(tmp_path, workers=2, ingests=2, extra_toml=state + COUNT_SIGNAL) as daemon:
        sub = Subscriber(daemon, b"c.")
        held = Subscriber(daemon, b"held.S")
        sub.sync()
        silent = [f"S{i}" for i in range(20)]
        live = [f"L{i}" for i in range(4)]
        feed(daemon.ingest, [ticks_of(silent)] * 3)
        # Under load the feeds may merge into fewer batches, so wait for the counts, not a number of records.
        # Two endpoints do not order a key's ticks between them: the second feeds once the first is applied.
        sub.collect(lambda: {r["k"]: r["count"] for r in sub.records if r["k"] in silent} == dict.fromkeys(silent, 3))
        feed(daemon.ingests[1], [ticks_of(silent[:5])])
        final = {key: 4 if key in silent[:5] else 3 for key in silent}
        sub.collect(lambda: {r["k"]: r["count"] for r in sub.records if r["k"] in final} == final)
        sent: dict[str, int] = defaultdict(int)
        stop = threading.Event()
        feeder = threading.Thread(target=keep_ticking, args=(daemon, live, stop, sent))
        feeder.start()
        try:
            daemon.wait_for(lambda: daemon.metric("streamd_keys_evicted_total") >= 21, 10, "silent keys evicted")
            assert daemon.metric("streamd_ingest_keys_released_total") >= 26
            assert daemon.metric("streamd_worker_keys") == len(live)
            assert daemon.metric("streamd_ingest_keys") == len(live)
        finally:
            stop.set()
            feeder.join(10)
        held.collect(lambda: {r["k"]: r["count"] for r in held.records} == final, 5)  # held rows go out on eviction
        held.close()
        sub.records.clear()
        feed(daemon.ingests[1], [ticks_of(silent[:2], price=7.0)])
        sub.collect(lambda: sum(r["k"] in silent for r in sub.records) >= 2)
        assert sorted((r["k"], r["count"], r["last"]) for r in sub.records if r["k"] in silent) == [
            ("S0", 1, 7.0),
            ("S1", 1, 7.0),
        ]
        books = daemon.wait_idle()
        assert (
            books['streamd_ticks_processed_total{worker="0"}'] + books['streamd_ticks_processed_total{worker="1"}']
            == books["streamd_ticks_received_total"]
        )
        sub.records.clear()
        feed(daemon.ingest, [ticks_of(live)])
        sub.collect(lambda: sum(r["k"] in live for r in sub.records) >= len(live))
        sub.close()
    counts = {r["k"]: r["count"] for r in sub.records if r["k"] in live}
    assert counts == {key: sent[key] + 1 for key in live}, "live keys kept their windows throughout"


@pytest.mark.timeout(120)
def test_keys_evicted_together_leave_in_steps_and_all_come_back_empty(tmp_path: Path) -> None:
    """30,000 keys fall silent at once: the ingest releases them a step at a time and a batch carries at
    most a share of them, yet every one is evicted at the worker, and each returning key counts from 1."""
    keys = [f"K{i}" for i in range(30_000)]
    state = '[state]\nkey_ttl = "300ms"\n'
    with running_daemon(tmp_path, workers=2, extra_toml=state + COUNT_SIGNAL) as daemon:
        feed(daemon.ingest, [ticks_of(keys[i : i + 5_000]) for i in range(0, len(keys), 5_000)])
        daemon.wait_for(lambda: daemon.metric("streamd_keys_evicted_total") >= len(keys), 30, "all keys evicted")
        assert daemon.metric("streamd_ingest_keys_released_total") == len(keys)
        assert daemon.metric("streamd_worker_keys") == daemon.metric("streamd_ingest_keys") == 0
        sub = Subscriber(daemon, b"c.")
        sub.sync()
        feed(daemon.ingest, [ticks_of(keys[:1_000], price=3.0)])
        sub.collect(lambda: sum(r["k"] in keys for r in sub.records) >= 1_000)
        sub.close()
        assert {(r["count"], r["last"]) for r in sub.records if r["k"] in keys} == {(1, 3.0)}
        assert accounting(daemon.wait_idle()) == 0


def test_new_keys_beyond_max_keys_are_dropped_and_known_keys_flow(tmp_path: Path) -> None:
    """max_keys = 4: ticks of a fifth key are dropped as key_limit, the four known keys keep their records."""
    with running_daemon(tmp_path, workers=2, extra_toml="[state]\nmax_keys = 4\n" + COUNT_SIGNAL) as daemon:
        sub = Subscriber(daemon, b"c.")
        sub.sync()  # the probe key is the first of the four
        feed(daemon.ingest, [ticks_of(["A", "B", "C"])])
        feed(daemon.ingest, [ticks_of(["D", "A", "E", "D"])])
        feed(daemon.ingest, [ticks_of(["A", "B"])])
        sub.collect(lambda: any(r["k"] == "A" and r["count"] == 3 for r in sub.records))
        books = daemon.wait_idle()
        sub.close()
        assert books['streamd_ticks_dropped_total{reason="key_limit"}'] == 3
        assert "state.max_keys reached" in daemon.log()
    counts = [r["count"] for r in sub.records if r["k"] == "A"]  # feeds merged under load give fewer records
    assert counts[-1] == 3 and counts == sorted(counts)
    assert not any(r["k"] in ("D", "E") for r in sub.records)


def blocks_of_new_keys(blocks: int, size: int, t0: int) -> tuple[list[bytes], dict[str, int]]:
    """Columnar messages: each brings ``size`` new keys and a second tick of the previous block's keys."""
    keys = [[f"N{b}.{i}" for i in range(size)] for b in range(blocks)]
    payloads, sent, t = [], {}, t0
    for b in range(blocks + 1):
        batch = (keys[b] if b < blocks else []) + (keys[b - 1] if b else [])
        n = len(batch)
        payloads.append(encode_columnar_bin(batch, t + np.arange(n), np.ones(n), np.ones(n)))
        t += n
        for key in batch:
            sent[key] = sent.get(key, 0) + 1
    return payloads, sent


@pytest.mark.timeout(90)
def test_a_flood_of_new_keys_keeps_each_keys_ticks_in_order(tmp_path: Path) -> None:
    """24,000 new keys, 3,000 a message (more than may reach a worker at once), each ticking again in the
    next message while maybe still waiting: every tick counted once, in order, none late."""
    with running_daemon(tmp_path, workers=2, extra_toml=COUNT_SIGNAL) as daemon:
        sub = Subscriber(daemon, b"c.")
        sub.sync()
        payloads, sent = blocks_of_new_keys(8, 3_000, time.time_ns())
        feed(daemon.ingest, payloads)
        sub.collect(lambda: len({r["k"] for r in sub.records if r["count"] == 2}) == len(sent), 60)
        books = daemon.wait_idle()
        sub.close()
    assert books.get('streamd_ticks_dropped_total{reason="late"}', 0) == 0
    assert accounting(books) == 0
    counts: dict[str, list[int]] = defaultdict(list)
    for record in sub.records:
        if record["k"] in sent:
            counts[record["k"]].append(record["count"])
    assert {key: max(c) for key, c in counts.items()} == sent
    assert all(c == sorted(c) for c in counts.values())


MANY_SIGNALS = "".join(
    f'[[signal]]\nname = "s{i}"\nwindow = "count"\nsize = 100\nstats = ["count", "mean", "std", "vwap"]\n'
    for i in range(12)
)


@pytest.mark.timeout(90)
def test_new_keys_past_the_backlog_are_shed_and_known_keys_flow(tmp_path: Path) -> None:
    """A worker slowed by 13 signals, 200,000 new keys at once and ingest.max_queue_bytes = 1 MiB (a fresh
    lane of 8,192 ticks): new keys are shed as new_key_backlog, counted; known keys keep their records."""
    extra = COUNT_SIGNAL + MANY_SIGNALS
    with running_daemon(tmp_path, workers=1, extra_toml=extra, ingest_toml="max_queue_bytes = 1048576") as daemon:
        sub = Subscriber(daemon, b"c.")
        sub.sync()
        known = [f"K{i}" for i in range(10)]
        feed(daemon.ingest, [ticks_of(known)])
        sub.collect(lambda: {r["k"] for r in sub.records} >= set(known))
        payloads, _ = blocks_of_new_keys(100, 2_000, time.time_ns())
        feed(daemon.ingest, [*payloads[:-1], ticks_of(known)])
        sub.collect(lambda: sum(r["k"] == "K0" and r["count"] == 2 for r in sub.records) == 1, 60)
        books = daemon.wait_idle(timeout=60)
        sub.close()
    assert books['streamd_ticks_dropped_total{reason="new_key_backlog"}'] > 0
    assert accounting(books) == 0
    assert "new keys arrive faster than the workers take them" in daemon.log()


def test_drains_that_announce_keys_are_timed_apart_from_those_of_known_keys(tmp_path: Path) -> None:
    """streamd_worker_apply_seconds: a drain bringing new keys counts as new_or_gone, one of known keys as known."""

    def drains() -> dict[str, float]:
        samples = daemon.scrape()
        kinds = ("new_or_gone", "known")
        return {kind: samples.get(f'streamd_worker_apply_seconds_count{{keys="{kind}"}}', 0.0) for kind in kinds}

    with running_daemon(tmp_path, workers=1, extra_toml=COUNT_SIGNAL) as daemon:
        feed(daemon.ingest, [ticks_of(["A", "B", "C"])])
        daemon.wait_for(lambda: sum(drains().values()) == 1, what="the new keys' drain")
        first = drains()
        feed(daemon.ingest, [ticks_of(["A", "B", "C"])])
        daemon.wait_for(lambda: sum(drains().values()) == 2, what="the known keys' drain")
        second = drains()
        assert daemon.metric("streamd_ticks_processed_total") == 6
    assert first == {"new_or_gone": 1.0, "known": 0.0}
    assert second == {"new_or_gone": 1.0, "known": 1.0}
