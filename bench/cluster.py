"""Cluster mode on loopback against the single-host daemon, in one run: throughput, takeover, replay.

``python -m bench.cluster [--quick] [--ticks N] [--rounds R]``

Contenders, interleaved round by round (medians reported, ratios against the single host):

- **single host**: ``streamd run`` with 1 worker, fed on its ingest;
- **cluster**: 3 nats-servers (JetStream, R3) and 3 instances of 1 worker each, fed on one
  instance's ingest: every tick goes ingest -> JetStream (R3) -> the owner's cluster process
  -> its worker;
- **cluster, sync always**: the same with ``sync_interval: always`` on every server (fsync
  before each acknowledgement), the durability setting discussed in docs/deploy.md.

Each contender gets the same pre-encoded columnar batches (1,000 ticks, 1,000 keys) pushed as
fast as its ingest takes them; throughput is ticks / (first send -> last tick processed, summed
over instances from /metrics). Then, on the default cluster: a kill -9 of one instance (time
until every partition is owned and live again), the replay that takeover needed (ticks
replayed per second), and a SIGTERM (time until every partition is live again). All processes
share this machine's cores with the servers, so the cluster's figures are a floor for hosts
of their own; the ratio is what to read.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from bench.report import Table, machine, machine_line, print_tables
from streamd.protocol import encode_columnar_bin
from tests.clusterharness import SIGNALS, instances, kill_instance
from tests.helpers import Daemon, running_daemon
from tests.natscluster import nats_cluster

PARTITIONS = 12
KEYS = 1_000
BATCH = 1_000
TTL = "3s"


def payloads(ticks: int, offset_ns: int) -> list[bytes]:
    """Columnar batches of in-order ticks (times increase across batches, so none is late)."""
    rng = np.random.default_rng(7)
    names = [f"K{i}" for i in range(KEYS)]
    out = []
    start = time.time_ns() + offset_ns
    for n in range(ticks // BATCH):
        keys = [names[i] for i in rng.integers(0, KEYS, BATCH).tolist()]
        t = start + (n * BATCH + np.arange(BATCH, dtype=np.int64)) * 1000
        out.append(encode_columnar_bin(keys, t, 100 + rng.normal(0, 1, BATCH), np.ones(BATCH)))
    return out


def processed(daemons: list[Daemon]) -> float:
    return sum(d.metric("streamd_ticks_processed_total") for d in daemons if d.proc.poll() is None)


def throughput(feed: str, daemons: list[Daemon], batches: list[bytes]) -> float:
    """Ticks per second from the first send until every tick is processed."""
    expected = len(batches) * BATCH
    base = processed(daemons)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 100)
    sock.setsockopt(zmq.LINGER, 10_000)
    sock.connect(feed)
    started = time.perf_counter()
    for payload in batches:
        sock.send(payload)
    deadline = time.monotonic() + 300
    while processed(daemons) - base < expected:
        if time.monotonic() > deadline:
            msg = f"only {processed(daemons) - base:.0f} of {expected} ticks processed"
            raise RuntimeError(msg)
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    sock.close()
    ctx.term()
    return expected / elapsed


def live(daemons: list[Daemon]) -> float:
    """Partitions owned and published (not replaying), over running instances."""
    total = 0.0
    for daemon in daemons:
        if daemon.proc.poll() is None:
            samples = daemon.scrape()
            total += samples.get("streamd_cluster_partitions_owned", 0.0)
            total -= samples.get("streamd_cluster_partitions_replaying", 0.0)
    return total


def owned(daemons: list[Daemon]) -> float:
    return sum(d.metric("streamd_cluster_partitions_owned") for d in daemons if d.proc.poll() is None)


def until(predicate: Any, timeout: float = 60) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            msg = "condition not met in time"
            raise RuntimeError(msg)
        time.sleep(0.02)
    return time.monotonic() - started


@contextlib.contextmanager
def single_host(tmp: Path) -> Iterator[tuple[str, list[Daemon]]]:
    with running_daemon(tmp, workers=1, extra_toml=SIGNALS) as daemon:
        yield daemon.ingest, [daemon]


@contextlib.contextmanager
def cluster(tmp: Path, sync: str = "") -> Iterator[tuple[str, list[Daemon]]]:
    with (
        nats_cluster(tmp, size=3, jetstream_extra=sync) as nats,
        instances(tmp, nats.urls, ["a", "b", "c"], PARTITIONS, TTL) as daemons,
    ):
        members = list(daemons.values())
        until(lambda: live(members) == PARTITIONS)
        yield daemons["a"].ingest, members


def takeovers(tmp: Path, batches: list[bytes]) -> dict[str, float]:
    """kill -9 then SIGTERM on the default cluster, after loading it with ``batches``."""
    with (
        nats_cluster(tmp, size=3) as nats,
        instances(tmp, nats.urls, ["a", "b", "c"], PARTITIONS, TTL) as daemons,
    ):
        members = list(daemons.values())
        until(lambda: live(members) == PARTITIONS)
        throughput(daemons["a"].ingest, members, batches)
        survivors = members[:2]
        replayed_before = sum(d.metric('streamd_cluster_ticks_read_total{phase="replay"}') for d in survivors)
        killed = time.monotonic()
        kill_instance(daemons["c"])
        until(lambda: owned(survivors) == PARTITIONS)
        acquired = time.monotonic()
        until(lambda: live(survivors) == PARTITIONS)
        done = time.monotonic()
        replayed = sum(d.metric('streamd_cluster_ticks_read_total{phase="replay"}') for d in survivors)
        replayed -= replayed_before
        left = time.monotonic()
        daemons["b"].proc.send_signal(15)
        until(lambda: live(members[:1]) == PARTITIONS)
        graceful = time.monotonic() - left
        return {
            "kill_owned_s": acquired - killed,
            "kill_live_s": done - killed,
            "replayed_ticks": replayed,
            "replay_ticks_per_s": replayed / max(done - acquired, 1e-3),
            "sigterm_live_s": graceful,
        }


def run(ticks: int, rounds: int) -> list[Table]:
    contenders: dict[str, Callable[[Path], contextlib.AbstractContextManager[tuple[str, list[Daemon]]]]] = {
        "single host (1 worker)": single_host,
        "cluster: 3 nats R3 + 3 instances": cluster,
        "cluster, sync_interval: always": lambda tmp: cluster(tmp, "sync_interval: always"),
    }
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(rounds):
        for name, start in contenders.items():
            with tempfile.TemporaryDirectory() as tmp, start(Path(tmp)) as (feed, daemons):
                rates[name].append(throughput(feed, daemons, payloads(ticks, round_ * 10**12)))
            print(f"round {round_ + 1}: {name}: {rates[name][-1]:,.0f} ticks/s", flush=True)
    base = statistics.median(rates["single host (1 worker)"])
    table = Table(
        f"Throughput, {ticks:,} ticks in 1,000-tick columnar batches, median of {rounds}",
        ["contender", "ticks/s", "vs single host"],
    )
    for name, values in rates.items():
        median = statistics.median(values)
        table.rows.append([name, f"{median:,.0f}", f"{median / base:.2f}x"])
    with tempfile.TemporaryDirectory() as tmp:
        figures = takeovers(Path(tmp), payloads(ticks, rounds * 10**12))
    takeover = Table(f"Takeover (lease TTL {TTL}, {PARTITIONS} partitions, 3 instances)", ["event", "value"])
    takeover.rows += [
        ["kill -9: partitions owned again after", f"{figures['kill_owned_s']:.2f} s"],
        ["kill -9: partitions live (replay done) after", f"{figures['kill_live_s']:.2f} s"],
        ["replay: ticks replayed", f"{figures['replayed_ticks']:,.0f}"],
        ["replay: ticks/s (acquired -> live)", f"{figures['replay_ticks_per_s']:,.0f}"],
        ["SIGTERM: every partition live on the last instance after", f"{figures['sigterm_live_s']:.2f} s"],
    ]
    return [table, takeover]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200k ticks, one round")
    parser.add_argument("--ticks", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    ticks, rounds = (200_000, 1) if args.quick else (args.ticks, args.rounds)
    print(f"python -m bench.cluster{' --quick' if args.quick else ''}\nMachine: {machine_line(machine())}\n")
    print_tables(run(ticks, rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
