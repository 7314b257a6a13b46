"""Three streamd instances on a 3-node JetStream cluster: exact windows through takeovers, fenced output."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.clusterharness import (
    Collector,
    Feed,
    Row,
    check_fencing,
    check_final_rows_cover_everything,
    check_rows_exact,
    instances,
    wait_until,
)
from tests.helpers import Daemon
from tests.natscluster import nats_cluster

PARTITIONS = 12
KEYS = [f"K{i}" for i in range(48)]


def owned(daemons: dict[str, Daemon]) -> dict[str, float]:
    """Partitions each running instance owns and publishes (owned minus replaying), from /metrics."""
    out = {}
    for name, daemon in daemons.items():
        if daemon.proc.poll() is None:
            samples = daemon.scrape()
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
    wait_until(lambda: settled(collector, sent), 30, "final records covering every tick")
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
            wait_until(
                lambda: owned({k: v for k, v in daemons.items() if k != "b"}) and all_live(daemons), 20, "all live"
            )
            time.sleep(1.5)
            resumed = resumed_within(collector, keys, left, "b")
            print(f"SIGTERM: keys of the leaver resumed within {resumed:.2f} s (lease TTL {ttl} s)")
            assert resumed < ttl, "a graceful leave waited for the lease TTL"
            assert leaver.proc.wait(10) == 0
            finish(collector, feed, daemons)
        finally:
            collector.close()
