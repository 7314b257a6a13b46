"""Three streamd instances on a 3-node JetStream cluster: exact windows through takeovers, fenced output."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from pathlib import Path

import pytest

from streamd.jetstream import TICKS_STREAM, connect
from tests.clusterharness import (
    Collector,
    Feed,
    Row,
    check_fencing,
    check_final_rows_cover_everything,
    check_rows_exact,
    instances,
    kill_instance,
    start_instance,
    wait_ready,
    wait_until,
)
from tests.helpers import Daemon
from tests.natscluster import nats_cluster

pytestmark = pytest.mark.cluster  # heavy: run alone (Makefile), not beside other test files

PARTITIONS = 12
KEYS = [f"K{i}" for i in range(48)]


def owned(daemons: dict[str, Daemon]) -> dict[str, float]:
    """Partitions each running instance owns and publishes (owned minus replaying), from /metrics."""
    out = {}
    for name, daemon in daemons.items():
        if daemon.proc.poll() is None:
            try:
                samples = daemon.scrape()
            except OSError:  # an instance on its way out (SIGTERM) stops serving /metrics
                continue
            out[name] = samples.get("streamd_cluster_partitions_owned", 0.0) - samples.get(
                "streamd_cluster_partitions_replaying", 0.0
            )
    return out


def all_live(daemons: dict[str, Daemon]) -> bool:
    return sum(owned(daemons).values()) == PARTITIONS


def settled(collector: Collector, sent: dict[str, int]) -> bool:
    """Every key's newest ``all`` row counts every tick sent for it."""
    counts: dict[str, int] = {}
    for row in collector.snapshot():
        if row.signal == "all":
            counts[row.key] = max(counts.get(row.key, 0), row.values["count"])
    return counts == sent


def shortfall(collector: Collector, sent: dict[str, int]) -> str:
    """Keys whose newest ``all`` row is behind the feed, with how far: what a timeout reports."""
    counts: dict[str, int] = {}
    for row in collector.snapshot():
        if row.signal == "all":
            counts[row.key] = max(counts.get(row.key, 0), row.values["count"])
    short = {key: (counts.get(key, 0), n) for key, n in sent.items() if counts.get(key, 0) != n}
    return f"{len(short)} keys behind (published, sent): {dict(sorted(short.items())[:12])}"


def books(daemons: dict[str, Daemon]) -> str:
    """Each live instance's tick and cluster counters, to tell a loss from a stall."""
    lines = []
    for name, daemon in daemons.items():
        if daemon.proc.poll() is not None:
            continue
        try:
            samples = daemon.scrape()
        except OSError as error:
            lines.append(f"{name}: /metrics unreachable ({error})")
            continue
        wanted = ("streamd_ticks_", "streamd_cluster_")
        lines.append(f"{name}: " + ", ".join(f"{k}={v:g}" for k, v in sorted(samples.items()) if k.startswith(wanted)))
    return "\n".join(lines)


def keys_of(rows: list[Row], instance: str) -> set[str]:
    return {row.key for row in rows if row.instance == instance}


def resumed_within(collector: Collector, keys: set[str], since: float, instance: str) -> float:
    """Seconds from ``since`` until every key in ``keys`` had a row from an instance other than ``instance``."""
    first: dict[str, float] = {}
    for row in collector.snapshot():
        if row.key in keys and row.instance != instance and row.received > since and row.key not in first:
            first[row.key] = row.received - since
    assert set(first) == keys, f"no records since {since} for {sorted(keys - set(first))[:5]}"
    return max(first.values())


def finish(collector: Collector, feed: Feed, daemons: dict[str, Daemon]) -> list[Row]:
    """Stop the feed, wait until every tick is reflected, then run every output check."""
    feed.stop()
    sent = {key: len(t) for key, (t, _, _) in feed.by_key().items()}
    try:
        wait_until(lambda: settled(collector, sent), 60, "final records covering every tick")
    except AssertionError as timeout:
        raise AssertionError(f"{timeout}\n{shortfall(collector, sent)}\n{books(daemons)}") from None
    rows = collector.snapshot()
    config_path = next(iter(daemons.values())).config_path
    checked = check_rows_exact(rows, feed, config_path)
    check_final_rows_cover_everything(rows, feed)
    tokens = check_fencing(rows)
    print(f"{feed.ticks()} ticks, {checked} rows checked against pandas, tokens per partition: {tokens}")
    return rows


@pytest.mark.timeout(120)
def test_normal_run_is_exact_and_sigterm_hands_over_at_once(tmp_path: Path) -> None:
    """3 instances: exact records; a SIGTERM'd instance releases first, so its keys resume well within the TTL."""
    ttl = 6.0
    with (
        nats_cluster(tmp_path, size=3) as nats,
        instances(tmp_path, nats.urls, ["a", "b", "c"], PARTITIONS, f"{ttl:g}s") as daemons,
    ):
        collector = Collector()
        for name, daemon in daemons.items():
            collector.add(name, daemon.publish)
        collector.start()
        try:
            wait_until(lambda: all_live(daemons), 30, "every partition owned and live")
            assert max(owned(daemons).values()) - min(owned(daemons).values()) <= 1
            feed = Feed(daemons["a"].ingest, KEYS)
            feed.start()
            time.sleep(4)
            leaver = daemons["b"]
            keys = keys_of(collector.snapshot(), "b")
            assert keys, "instance b published nothing"
            left = time.monotonic()
            leaver.proc.send_signal(signal.SIGTERM)
            survivors = {k: v for k, v in daemons.items() if k != "b"}
            wait_until(lambda: all_live(survivors), 20, "every partition live on the survivors")
            time.sleep(1.5)
            resumed = resumed_within(collector, keys, left, "b")
            print(f"SIGTERM: keys of the leaver resumed within {resumed:.2f} s (lease TTL {ttl} s)")
            assert resumed < ttl, "a graceful leave waited for the lease TTL"
            assert leaver.proc.wait(10) == 0
            finish(collector, feed, daemons)
        finally:
            collector.close()


def stream_leader(urls: list[str]) -> str:
    """The server name of the ticks stream's Raft leader."""

    async def ask() -> str:
        nc = await connect(urls, "test-leader-probe")
        try:
            info = await nc.jetstream().stream_info(TICKS_STREAM)
        finally:
            await nc.close()
        assert info.cluster is not None and info.cluster.leader
        return str(info.cluster.leader)

    return asyncio.run(asyncio.wait_for(ask(), 10))


def longest_silence(rows: list[Row], since: float, until: float) -> float:
    """The longest gap between consecutive rows (from any instance) arriving in [since, until]."""
    times = sorted(row.received for row in rows if since <= row.received <= until)
    edges = [since, *times, until]
    return max(b - a for a, b in itertools.pairwise(edges))


@pytest.mark.timeout(120)
def test_kill_9_of_a_reading_instance_then_a_new_one_joins(tmp_path: Path) -> None:
    """kill -9 of a non-feeding instance: its keys resume within 10 s; a new instance joins; nothing lost."""
    with (
        nats_cluster(tmp_path, size=3) as nats,
        instances(tmp_path, nats.urls, ["a", "b", "c"], PARTITIONS, "2s") as daemons,
    ):
        collector = Collector()
        for name, daemon in daemons.items():
            collector.add(name, daemon.publish)
        collector.start()
        try:
            wait_until(lambda: all_live(daemons), 30, "every partition owned and live")
            feed = Feed(daemons["a"].ingest, KEYS)
            feed.start()
            time.sleep(3)
            keys = keys_of(collector.snapshot(), "c")
            assert keys, "instance c published nothing"
            killed = time.monotonic()
            kill_instance(daemons["c"])
            wait_until(lambda: all_live(daemons), 10, "the dead instance's partitions owned and live again")
            wait_until(lambda: _resumed(collector, keys, killed, "c"), 10, "every key of c resumed")
            resumed = resumed_within(collector, keys, killed, "c")
            assert resumed < 10
            print(f"kill -9: every key of the dead instance resumed within {resumed:.2f} s (lease TTL 2 s)")

            joined = time.monotonic()
            daemons["d"] = start_instance(tmp_path, nats.urls, "d", PARTITIONS, "2s")
            wait_ready(daemons["d"])
            collector.add("d", daemons["d"].publish)
            wait_until(lambda: owned(daemons).get("d") == PARTITIONS // 3 and all_live(daemons), 20, "d's share live")
            print(f"join: the new instance owns and publishes its share {time.monotonic() - joined:.2f} s after start")
            time.sleep(2)
            rows = finish(collector, feed, daemons)
            assert keys_of(rows, "d"), "the new instance published nothing"
        finally:
            collector.close()


def _resumed(collector: Collector, keys: set[str], since: float, instance: str) -> bool:
    try:
        resumed_within(collector, keys, since, instance)
    except AssertionError:
        return False
    return True


@pytest.mark.timeout(120)
def test_kill_9_of_the_stream_leader_stalls_briefly_and_loses_nothing(tmp_path: Path) -> None:
    """The ticks stream's leader server dies: output stalls less than 10 s, and every window stays exact."""
    with (
        nats_cluster(tmp_path, size=3) as nats,
        instances(tmp_path, nats.urls, ["a", "b", "c"], PARTITIONS, "6s") as daemons,
    ):
        collector = Collector()
        for name, daemon in daemons.items():
            collector.add(name, daemon.publish)
        collector.start()
        try:
            wait_until(lambda: all_live(daemons), 30, "every partition owned and live")
            feed = Feed(daemons["a"].ingest, KEYS)
            feed.start()
            time.sleep(3)
            leader = stream_leader(nats.urls)
            killed = time.monotonic()
            nats.kill(leader)
            time.sleep(10)
            silence = longest_silence(collector.snapshot(), killed, time.monotonic())
            print(f"stream leader {leader} killed: longest output silence {silence:.2f} s")
            finish(collector, feed, daemons)
            assert silence < 10
        finally:
            collector.close()
