"""Section (d): publish latency of the daemon next to a trivial echo, same sender, same subscriber.

The echo is the least any ZeroMQ + msgpack relay must do: one process, PULL -> ``msgpack.unpackb``
-> build and ``packb`` a record -> PUB with the record topic. Both contenders get the same paced
single-tick map messages (string keys) from the same generator code and are read by the same
subscriber code, interleaved in one run, so the difference is what the daemon adds.

The generator stamps each message's event time with its wall clock at send; a record's ``t`` is the
newest tick's event time, so ``subscriber receive wall clock - t`` is send-to-receive latency.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import numpy as np
import zmq

from bench.harness import (
    CONTEXT,
    HDR_BUCKETS,
    Daemon,
    Feed,
    SignalOptions,
    finish,
    hdr_quantiles,
    offer_load,
    running_daemon,
    start_subscriber,
)
from bench.report import Table, verdict
from bench.ticks import symbols
from tests.helpers import free_port

LOADS = (1_000, 10_000, 50_000)
TARGET_LOAD = 10_000
N_KEYS = 1_000
FEED = Feed("map", N_KEYS)
QUANTILES = (0.5, 0.99, 0.999, 1.0)
SIGNAL = "px1s"
TOPIC = f"{SIGNAL}."


class Target(Protocol):
    """Where a contender reads ticks and publishes records."""

    @property
    def ingests(self) -> list[str]: ...

    @property
    def publish(self) -> str: ...


# -- the trivial echo ----------------------------------------------------------------------------


def echo_main(ingest: str, publish: str, ready: Any, stop: Any) -> None:
    """PULL a single-tick map, decode it, re-encode it as a record, PUB it on ``{signal}.{key}``."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(ingest)
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 1_000_000)
    pub.bind(publish)
    ready.set()
    recv, send, unpackb, packb, now_ns = pull.recv, pub.send, msgpack.unpackb, msgpack.packb, time.time_ns
    more = int(zmq.SNDMORE)
    while not stop.is_set():
        if not pull.poll(100):
            continue
        try:
            while True:
                tick = unpackb(recv(zmq.NOBLOCK))
                record = {"signal": SIGNAL, "k": tick["k"], "t": tick["t"], "pub_ns": now_ns(), "last": tick["p"]}
                send(f"{SIGNAL}.{tick['k']}".encode(), more)
                send(packb(record))
        except zmq.Again:
            pass
    pull.close(0)
    pub.close(0)
    ctx.term()


@dataclass
class Echo:
    """The echo process on free ports."""

    ingests: list[str]
    publish: str
    process: Any = None
    stop_event: Any = None

    @classmethod
    def start(cls) -> Echo:
        echo = cls([f"tcp://127.0.0.1:{free_port()}"], f"tcp://127.0.0.1:{free_port()}")
        ready, echo.stop_event = CONTEXT.Event(), CONTEXT.Event()
        echo.process = CONTEXT.Process(target=echo_main, args=(echo.ingests[0], echo.publish, ready, echo.stop_event))
        echo.process.start()
        ready.wait(30)
        return echo

    def stop(self) -> None:
        self.stop_event.set()
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


# -- one loaded run, and idle round trips (the same code for both contenders) --------------------


def loaded_run(target: Target, load: int, duration: float, settle: Callable[[], object]) -> dict[str, Any]:
    """Offer ``load`` ticks/s for ``duration`` s; the subscriber's latency quantiles (ns)."""
    settle()
    subscriber = start_subscriber(target.publish, TOPIC, measure_latency=True, warmup_s=0.5)
    generated = offer_load(target.ingests, FEED, load, duration)
    settle()
    time.sleep(0.2)
    counts = np.asarray(finish(subscriber, 1)[0]["hdr"])
    return {"achieved": generated["achieved"], "records": int(counts.sum()), "ns": hdr_quantiles(counts, QUANTILES)}


def idle_round_trips(target: Target, n: int, gap_s: float = 0.05) -> list[float]:
    """Send one tick at a time to an idle target; seconds from send to its record at a subscriber."""
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(target.ingests[0])
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
    sub.connect(target.publish)
    keys = symbols(N_KEYS).tolist()
    samples: list[float] = []
    try:
        for i in range(n + 5):  # the first few only make sure the subscription has reached the publisher
            time.sleep(gap_s)
            sent = time.time_ns()
            push.send(msgpack.packb({"k": keys[i % N_KEYS], "t": sent, "p": 100.0, "q": 1.0}))
            while sub.poll(1000):
                record = msgpack.unpackb(sub.recv_multipart()[-1])
                if record["t"] == sent:
                    if i >= 5:
                        samples.append((time.time_ns() - sent) / 1e9)
                    break
    finally:
        push.close(0)
        sub.close(0)
        ctx.term()
    return samples


# -- the section ---------------------------------------------------------------------------------


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus ``histogram_quantile``: linear interpolation inside the cumulative bucket."""
    total = buckets[-1][1] if buckets else 0.0
    if not total:
        return float("nan")
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return lower_bound


def medians_ms(runs: list[dict[str, Any]]) -> list[float]:
    return [statistics.median(r["ns"][i] for r in runs) / 1e6 for i in range(len(QUANTILES))]


def load_verdict(daemon_ms: list[float], echo_ms: list[float]) -> tuple[str, str]:
    """At the target load: p50 <= echo p50 + 1 ms and p99 <= 2 x echo p99 + 1 ms."""
    p50_limit, p99_limit = echo_ms[0] + 1.0, 2 * echo_ms[1] + 1.0
    target = f"p50 <= {p50_limit:.2f}, p99 <= {p99_limit:.2f} ms"
    return target, verdict(min(p50_limit / daemon_ms[0], p99_limit / daemon_ms[1]), 1.0)


Contenders = dict[str, tuple[Target, Callable[[], object]]]


def measure_load(daemon: Daemon, contenders: Contenders, load: int, runs: int, duration: float) -> dict[str, Any]:
    """``runs`` interleaved runs of each contender at ``load``, and the daemon's own latency histogram."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    before = dict(daemon.scrape().buckets("streamd_latency_seconds"))
    for _ in range(runs):
        for name, (contender, settle) in contenders.items():
            results[name].append(loaded_run(contender, load, duration, settle))
    after = daemon.scrape().buckets("streamd_latency_seconds")
    delta = [(bound, count - before.get(bound, 0.0)) for bound, count in after]
    internal = [histogram_quantile(delta, q) * 1e3 for q in (0.5, 0.99, 0.999)]
    return {"runs": results, "ms": {name: medians_ms(r) for name, r in results.items()}, "daemon_internal_ms": internal}


def load_table(loads: dict[int, dict[str, Any]], runs: int, duration: float) -> Table:
    table = Table(
        f"(d) Latency, send -> subscriber receive: daemon vs trivial echo ({N_KEYS:,} string keys, single-tick "
        f"maps); median of {runs} interleaved runs x {duration:.0f} s",
        ["offered ticks/s", "contender", "records", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "target", "verdict"],
    )
    for load, measured in loads.items():
        ms = measured["ms"]
        for name, runs_of in measured["runs"].items():
            goal = result = ""
            if name == "daemon" and load == TARGET_LOAD:
                goal, result = load_verdict(ms["daemon"], ms["echo"])
            records = sum(r["records"] for r in runs_of)
            table.add(f"{load:,}", name, f"{records:,}", *(f"{v:.2f}" for v in ms[name]), goal, result)
    table.notes += [
        "Daemon: built-in three signals in record mode (one message per key per batch, no emit_interval), "
        "max_batch_delay 1ms, workers = one per core; started with start_new_session=True (its own session and "
        "autogroup, as under systemd). Echo: one process, PULL -> msgpack.unpackb -> packb a record map "
        "{signal, k, t, pub_ns, last} -> PUB on `px1s.{key}`.",
        "Same generator (one paced process, pre-encoded payloads, event time = wall clock at send) and same "
        "subscriber (subscribes to `px1s.`, decodes every record, 0.5 s warm-up excluded) for both; runs "
        "alternate echo, daemon, echo, daemon.",
        "Latency = subscriber wall clock at receive - record `t`; a key with several ticks in one daemon batch "
        "is measured at its newest tick.",
        f"HDR-style histogram: exact below 128 ns, then 64 linear sub-buckets per power of two "
        f"({HDR_BUCKETS} buckets, < 1.6% error); quantiles are bucket upper edges.",
        "Daemon's own streamd_latency_seconds (ingest receive -> publish) per load is in the results JSON "
        "(daemon_internal_ms, p50/p99/p99.9).",
    ]
    table.data = {str(load): measured for load, measured in loads.items()}
    return table


def idle_table(idle: dict[str, list[float]], n: int) -> Table:
    table = Table(
        f"(d) Idle round trip: one tick -> its record, {n} ticks 50 ms apart",
        ["contender", "round trips", "p50 ms", "p90 ms", "max ms", "target", "verdict"],
    )
    for name, samples in idle.items():
        goal = result = ""
        if name == "daemon" and samples and idle["echo"]:
            limit = statistics.median(idle["echo"]) * 1e3 + 1.0
            goal = f"p50 <= echo p50 + 1 ms = {limit:.2f} ms"
            result = verdict(limit / (statistics.median(samples) * 1e3), 1.0)
        sorted_ms = sorted(s * 1e3 for s in samples) or [float("nan")]
        p50, p90 = statistics.median(sorted_ms), sorted_ms[int(0.9 * (len(sorted_ms) - 1))]
        table.add(name, len(samples), f"{p50:.2f}", f"{p90:.2f}", f"{sorted_ms[-1]:.2f}", goal, result)
    table.notes.append(
        "One PUSH and one SUB socket in the benchmark process; each tick waits for its own record before the "
        "next is sent, so nothing queues: this is the fixed cost of a hop through each contender."
    )
    table.data = {"idle_s": idle}
    return table


def run(quick: bool, earlier: dict[str, Any]) -> dict[str, Any]:
    runs, duration, idle_n = (2, 2.0, 40) if quick else (3, 10.0, 200)
    echo = Echo.start()
    try:
        with running_daemon(0, SignalOptions()) as daemon:
            contenders: Contenders = {"echo": (echo, lambda: None), "daemon": (daemon, lambda: daemon.wait_idle(5.0))}
            idle = {name: idle_round_trips(contender, idle_n) for name, (contender, _) in contenders.items()}
            loads = {load: measure_load(daemon, contenders, load, runs, duration) for load in LOADS}
    finally:
        echo.stop()
    return {"title": "4. (d) Latency", "tables": [load_table(loads, runs, duration), idle_table(idle, idle_n)]}
