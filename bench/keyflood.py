"""``python -m bench.keyflood [--quick]``: bounded per-key state under a flood of new keys, in a real daemon.

1. Memory: distinct keys (10 M, ``--quick`` 1.2 M) arrive at a steady rate, one tick each, through a
   daemon with ``key_ttl = "10s"``; the resident memory of all daemon processes (from /proc) is
   sampled over time. Once a key_ttl has passed, keys are evicted as fast as they arrive, so memory
   stays flat: the slope after warm-up is printed. Then what an eviction costs per key, in process.
2. Admission: what letting 1,000 new keys go costs the ingest, by the backlog of new keys' ticks.
3. New-key rate: per ingest, a feed where every tick is a new key, as fast as the daemon takes it
   and paced at 200k keys/s, while live keys tick beside it; the live keys' record latency and rate
   are compared with a run without the flood, in the same daemon, as ratios, over the whole phase
   and once the flood's key population is steady. ``--isolate`` also runs each phase with the
   worker on a core of its own and the flood's processes at nice 19, and (with ``--flood-endpoint
   own``) once more with the flood's ingest on the worker's core (:class:`Placement`).
4. With more workers: a queueing model (:func:`predicted_live_latency`) of what the paced flood
   costs the live keys when ``shard_for`` spreads it over N workers, each on a core of its own,
   built from the live keys' latency alone and the worker's drain times under the flood, both
   measured in part 3; its 1-worker prediction is shown next to the measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from bench.harness import CONTEXT, Daemon, Metrics, SignalOptions, finish, hdr_quantiles, hdr_value, start_subscriber
from bench.report import Table, print_tables
from streamd.config import DEFAULT_SIGNALS
from streamd.keytable import KeyTable
from streamd.protocol import encode_columnar_bin
from streamd.router import KeyRouter, Outbox
from streamd.windows import Engine

BATCH = 2_000  # new keys per message
PACED = 200_000.0  # new keys/s of the paced flood
PACED_PHASE = "flood paced at 200k/s"
LIVE_KEYS = 100
LIVE_TICKS_PER_S = 5_000


# -- load generators (each in its own process) ------------------------------------------------


class NewKeyMessages:
    """Messages of ``BATCH`` keys never seen before, ``n{i:010d}`` from ``first`` on, written in place.

    One encoded template is reused: each message writes the next keys' digits and the send time into
    it with NumPy (0.15 ms per message against 0.43 ms to build and encode the keys in Python), so
    the machine's two cores go to the daemon rather than to the load generator.
    """

    DIGITS = 10

    def __init__(self, first: int) -> None:
        keys = [f"n{i:0{self.DIGITS}d}" for i in range(BATCH)]
        marks = np.full(BATCH, 0x5EED5EED5EED5EED, np.int64)
        self.buffer = bytearray(encode_columnar_bin(keys, marks, np.full(BATCH, 100.0)))
        key_at = self.buffer.index(b"\xab" + keys[0].encode()) + 2  # after the fixstr header and the "n"
        shape, strides = (BATCH, self.DIGITS), (self.DIGITS + 2, 1)
        self.digits = np.ndarray(shape, np.uint8, buffer=self.buffer, offset=key_at, strides=strides)
        self.t = np.ndarray(BATCH, np.dtype("<i8"), buffer=self.buffer, offset=self.buffer.index(marks.tobytes()))
        self.powers = 10 ** np.arange(self.DIGITS - 1, -1, -1, dtype=np.int64)
        self.next = first

    def advance(self) -> None:
        """Write the next ``BATCH`` new keys into the message."""
        numbers = np.arange(self.next, self.next + BATCH, dtype=np.int64)
        self.digits[:] = (numbers[:, None] // self.powers % 10 + ord("0")).astype(np.uint8)
        self.next += BATCH

    def stamped(self) -> bytearray:
        """The message with its ticks' event time set to now (rewritten in place by the next call)."""
        self.t[:] = time.time_ns()
        return self.buffer


def flood_main(
    endpoint: str, first: int, total: int, keys_per_s: float, ready: Any, go: Any, stop: Any, sent: Any
) -> None:
    """Batches of keys never seen before, from ``first`` on, ``total`` of them (a multiple of ``BATCH``),
    paced or as fast as taken."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 4)
    sock.connect(endpoint)
    messages = NewKeyMessages(first)
    ready.set()
    go.wait()
    started = time.perf_counter()
    done = 0
    messages.advance()
    while done < total and not stop.is_set():
        if keys_per_s:
            wait = started + done / keys_per_s - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        try:
            sock.send(messages.stamped(), zmq.NOBLOCK, copy=True)
        except zmq.Again:
            time.sleep(0.0005)
            continue
        done += BATCH
        sent.value = done
        messages.advance()
    sock.close(linger=5000)
    ctx.term()


def live_main(endpoint: str, ready: Any, go: Any, stop: Any, sent: Any) -> None:
    """``LIVE_KEYS`` keys ticking at ``LIVE_TICKS_PER_S`` in all, stamped with the send wall clock."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(endpoint)
    keys = [f"L{i}" for i in range(LIVE_KEYS)]
    p = np.full(LIVE_KEYS, 50.0)
    ready.set()
    go.wait()
    started = time.perf_counter()
    done = 0
    while not stop.is_set():
        wait = started + done / LIVE_TICKS_PER_S - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        sock.send(encode_columnar_bin(keys, np.full(LIVE_KEYS, time.time_ns(), np.int64), p))
        done += LIVE_KEYS
        sent.value = done
    sock.close(linger=1000)
    ctx.term()


@dataclass
class Generator:
    process: Any
    stop: Any
    sent: Any


def start_generators(
    targets: list[tuple[Any, tuple[Any, ...]]], before_go: Callable[[list[Generator]], None] | None = None
) -> list[Generator]:
    """Start each target, wait until all are connected, call ``before_go``, then let them go together."""
    go = CONTEXT.Event()
    generators, readies = [], []
    for target, args in targets:
        ready, stop, sent = CONTEXT.Event(), CONTEXT.Event(), CONTEXT.Value("q", 0)
        process = CONTEXT.Process(target=target, args=(*args, ready, go, stop, sent))
        process.start()
        generators.append(Generator(process, stop, sent))
        readies.append(ready)
    for ready in readies:
        ready.wait(60)
    if before_go is not None:
        before_go(generators)
    time.sleep(0.3)
    go.set()
    return generators


def stop_generators(generators: list[Generator]) -> None:
    for generator in generators:
        generator.stop.set()
    for generator in generators:
        generator.process.join(30)
        if generator.process.is_alive():
            generator.process.kill()


# -- where the rate phases' processes run --------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """The CPUs and niceness given to the processes of a rate phase.

    ``shared`` leaves them as they are on this box: every process on either core at equal priority.
    ``isolated`` models a machine with a core for each of them: the worker gets core 0 to itself,
    and the flood's ingest, generator and recorder run on core 1 at nice 19 beside the live feed,
    live ingest, forwarder and latency subscriber, so the live path waits for the flood only where
    they meet inside streamd (the worker they share), not for a turn on a core.
    """

    name: str
    isolated: bool
    flood_ingest_by_worker: bool = False  # the flood's ingest on core 0 (nice 19) instead of core 1

    def arrange(self, daemon: Daemon, live: list[int], flood: list[int]) -> None:
        """Place the daemon's processes and the bench's ``live`` and ``flood`` side processes."""
        assert daemon.process is not None
        everything = set(range(os.cpu_count() or 1))
        flood_ingest = f"streamd-ingest{len(daemon.ingests) - 1}" if len(daemon.ingests) > 1 else None
        for pid, name in session_processes(daemon.process.pid).items():
            if not self.isolated:
                place(pid, everything, 0)
            elif name.startswith("streamd-worker"):
                place(pid, {0}, 0)
            elif name == flood_ingest:
                place(pid, {0} if self.flood_ingest_by_worker else {1}, 19)
            else:
                place(pid, {1}, 0)
        for pid in [os.getpid(), *live]:
            place(pid, {1} if self.isolated else everything, 0)
        for pid in flood:
            place(pid, {1} if self.isolated else everything, 19 if self.isolated else 0)


SHARED = Placement("", isolated=False)
ISOLATED = Placement(" [isolated]", isolated=True)
FLOOD_INGEST_BY_WORKER = Placement(" [isolated, flood ingest on core 0]", isolated=True, flood_ingest_by_worker=True)


def session_stats(session: int) -> dict[int, list[bytes]]:
    """Process id -> the fields of /proc/PID/stat after the name, for every process in ``session``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:
            found[int(entry.name)] = fields
    return found


def session_processes(session: int) -> dict[int, str]:
    """Process id -> kernel name (``comm``) of every process in ``session``."""
    found = {}
    for pid in session_stats(session):
        try:
            found[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
    return found


def place(pid: int, cpus: set[int], nice: int) -> None:
    """Every thread of ``pid`` (ZeroMQ's I/O threads too) on ``cpus`` at ``nice``."""
    try:
        threads = [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cpus)
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:
            continue  # the thread ended meanwhile


# -- measuring --------------------------------------------------------------------------------


def session_rss(session: int) -> int:
    """Resident bytes of every process in ``session`` (the daemon runs in its own)."""
    return sum(int(fields[21]) for fields in session_stats(session).values()) * 4096


def mib(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def daemon_keys(daemon: Daemon) -> dict[str, float]:
    m = daemon.scrape()
    return {
        "routed": m.total("streamd_ingest_keys"),
        "held": m.total("streamd_worker_keys"),
        "released": m.total("streamd_ingest_keys_released_total"),
        "evicted": m.total("streamd_keys_evicted_total"),
        "processed": m.total("streamd_ticks_processed_total"),
        "received": m.total("streamd_ticks_received_total"),
        "busy": m.total("streamd_worker_busy_seconds_total"),
        "shed": m.total("streamd_ticks_dropped_total", reason="new_key_backlog"),
    }


# -- 1. memory under a steady flood -----------------------------------------------------------


def memory_under_flood(total: int, keys_per_s: float, ttl_s: float) -> Table:
    table = Table(
        f"Resident memory of the daemon: {total:,} distinct keys at {keys_per_s:,.0f}/s, one tick each, "
        f'key_ttl = "{ttl_s:g}s" (1 ingest, 1 worker, the built-in 3 signals)',
        ["t (s)", "keys sent", "keys routed", "keys held", "keys evicted", "RSS (MiB)"],
    )
    extra = f'[state]\nkey_ttl = "{ttl_s:g}s"\nmax_keys = 10000000\n'
    daemon = Daemon(1, SignalOptions(), extra_toml=extra)
    daemon.start()
    try:
        assert daemon.process is not None
        session = daemon.process.pid
        base = session_rss(session)
        generators = start_generators([(flood_main, (daemon.ingests[0], 0, total, keys_per_s))])
        started = time.monotonic()
        samples: list[tuple[float, int, int]] = []
        next_row = 0.0
        while generators[0].process.is_alive():
            time.sleep(1.0)
            now = time.monotonic() - started
            sent, rss = generators[0].sent.value, session_rss(session)
            samples.append((now, sent, rss))
            if now >= next_row:
                keys = daemon_keys(daemon)
                table.add(
                    f"{now:.0f}",
                    f"{sent:,}",
                    f"{keys['routed']:,.0f}",
                    f"{keys['held']:,.0f}",
                    f"{keys['evicted']:,.0f}",
                    mib(rss),
                )
                next_row = now + max(1.0, total / keys_per_s / 15)
        stop_generators(generators)
        elapsed = time.monotonic() - started
        ok, _ = daemon.wait_idle(60)
        keys = daemon_keys(daemon)
        table.add(
            f"{elapsed:.0f} (end)",
            f"{total:,}",
            f"{keys['routed']:,.0f}",
            f"{keys['held']:,.0f}",
            f"{keys['evicted']:,.0f}",
            mib(session_rss(session)),
        )
    finally:
        daemon.stop()
    warm = [(t, s, r) for t, s, r in samples if t >= 2 * ttl_s]
    if len(warm) >= 3:
        t, sent, rss = (np.array(column, float) for column in zip(*warm, strict=True))
        per_s = np.polyfit(t, rss, 1)[0]
        per_million = np.polyfit(sent, rss, 1)[0] * 1e6
        table.notes.append(
            f"after warm-up (t >= {2 * ttl_s:g} s, {len(warm)} samples): RSS slope {per_s / 2**20:+.2f} MiB/s, "
            f"{per_million / 2**20:+.1f} MiB per million keys sent; RSS {mib(rss.min())}..{mib(rss.max())} MiB "
            f"(idle daemon before the flood: {mib(base)} MiB)"
        )
    table.notes.append(f"achieved {total / elapsed:,.0f} new keys/s; went idle with the books balanced: {ok}")
    table.data = {"samples": samples, "base_rss": base}
    return table


def eviction_cost(n: int, repeats: int = 3) -> Table:
    """What evicting a key costs in each process, in process (no sockets), median of ``repeats``."""
    table = Table(f"Eviction cost per key ({n:,} keys at once, median of {repeats})", ["where", "what", "ns per key"])
    ingest, worker = [], []
    keys = [f"n{i}" for i in range(n)]
    for _ in range(repeats):
        router = KeyRouter(2)
        outboxes = [Outbox(), Outbox()]
        router.route(keys, outboxes)
        for w in (0, 1):  # a pending key (its worker not yet told) is never evicted: let them all go
            router.admit(w, outboxes[w], len(outboxes[w].fresh_keys))
        router.epoch = 10
        started = time.perf_counter()
        assert router.evict_silent(5, outboxes, 0) == n
        for w in (0, 1):
            router.recycle(w, outboxes[w].gone)
        ingest.append((time.perf_counter() - started) / n * 1e9)

        table_ = KeyTable()
        engine = Engine(DEFAULT_SIGNALS)
        table_.learn(0, 0, list(enumerate(keys)))
        slots = np.arange(n, dtype=np.int64)
        local = table_.local(0, 0, slots)
        engine.process(local, np.full(n, 1, np.int64), np.ones(n), np.ones(n))
        started = time.perf_counter()
        table_.forget(0, 0, slots.tolist())
        dying = table_.take_dying()
        engine.evict(dying)
        table_.recycle(dying)
        worker.append((time.perf_counter() - started) / n * 1e9)
    table.add("ingest", "find silent keys, drop their codes, announce and recycle slots", f"{np.median(ingest):,.0f}")
    table.add("worker", "unmap slots, drop engine state (3 signals), free the index", f"{np.median(worker):,.0f}")
    return table


def admission_cost(per_message: int = 1_000, keys: int = 1_000, repeats: int = 30) -> Table:
    """What letting ``keys`` new keys go costs the ingest, by fresh-lane backlog, in process (median of ``repeats``).

    A flood of single-tick keys fills the lane in parts of ``per_message`` ticks, as drains of a
    flood do; each admission then takes the oldest ``keys`` keys and all their ticks.
    """
    table = Table(
        f"Admission cost at the ingest: {keys:,} new keys let go, by fresh-lane backlog (median of {repeats})",
        ["backlog (ticks)", "ms per admission"],
    )
    for backlog in (100_000, 1_000_000, 2_000_000):
        router = KeyRouter(1)
        outbox = Outbox()
        for start in range(0, backlog, per_message):
            codes = router.route([f"n{i}" for i in range(start, start + per_message)], [outbox])
            ones = np.ones(per_message)
            outbox.add_fresh((codes, np.arange(per_message, dtype=np.int64), ones, ones), 0, router.floor(0, codes))
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            router.admit(0, outbox, keys)
            times.append(time.perf_counter() - started)
        table.add(f"{backlog:,}", f"{np.median(times) * 1e3:.3f}")
    return table


# -- 2. new-key rate with live keys beside -----------------------------------------------------


@dataclass(frozen=True)
class Drains:
    """Drains that announced or released keys, from ``streamd_worker_apply_seconds{keys="new_or_gone"}``:
    how many fell in each bucket (the last entry: above the last bound) and their total seconds."""

    bounds: np.ndarray
    counts: np.ndarray
    seconds: float

    @staticmethod
    def read(metrics: Metrics) -> Drains:
        bounds, cumulative = zip(*metrics.buckets("streamd_worker_apply_seconds", keys="new_or_gone"), strict=True)
        counts = np.diff(np.array(cumulative), prepend=0.0)
        seconds = metrics.total("streamd_worker_apply_seconds_sum", keys="new_or_gone")
        return Drains(np.array(bounds[:-1]), counts, seconds)  # the last bound is +Inf

    def __sub__(self, earlier: Drains) -> Drains:
        return Drains(self.bounds, self.counts - earlier.counts, self.seconds - earlier.seconds)

    def __add__(self, other: Drains) -> Drains:
        return Drains(self.bounds, self.counts + other.counts, self.seconds + other.seconds)


def predicted_live_latency(
    alone: np.ndarray, drains: Drains, elapsed_s: float, workers: int, samples: int = 400_000
) -> tuple[float, float]:
    """Live latency (p50, p99 in ns) if the flood that caused ``drains`` over ``elapsed_s`` on one
    worker were spread over ``workers``, each on a core of its own.

    A live batch that reaches its worker during a flood drain waits for the rest of it (the worker
    applies known keys' batches first once it looks again, :func:`streamd.worker.known_first`), and
    otherwise does not wait. Arrivals see time averages, so it lands in a flood drain with
    probability equal to the fraction of time the worker spends in them, which ``workers`` divides;
    the drain it lands in is drawn in proportion to its length, and what is left of it is uniform.
    The drains keep the lengths measured with one worker; with a smaller share of the flood each,
    a worker's batches of new keys would be smaller, so this overstates the wait. Everything else
    is the live keys' own latency alone (``alone``: an HDR histogram), drawn independently.
    """
    rng = np.random.default_rng(0)
    live = hdr_value(rng.choice(alone.size, samples, p=alone / alone.sum())).astype(np.float64)
    lows = np.concatenate([[0.0], drains.bounds])
    highs = np.concatenate([drains.bounds, [drains.bounds[-1]]])  # above the last bound: taken at it
    weights = drains.counts * (lows + highs) / 2
    bucket = rng.choice(weights.size, samples, p=weights / weights.sum())
    length = rng.uniform(lows[bucket], highs[bucket])
    busy = drains.seconds / elapsed_s / workers
    wait = np.where(rng.random(samples) < busy, rng.random(samples) * length, 0.0)
    p50, p99 = np.percentile(live + wait * 1e9, [50, 99])
    return float(p50), float(p99)


def live_phase(
    daemon: Daemon,
    seconds: float,
    flood_rate: float | None,
    first_key: int,
    *,
    everything: bool = False,
    placement: Placement = SHARED,
    steady_after_s: float = 4.5,
) -> dict[str, Any]:
    """Live keys for ``seconds``, with a flood of new keys beside them (None: no flood; 0: unpaced).

    Two latency subscribers listen to the live keys only: one from 0.5 s on, one from
    ``steady_after_s`` on, once the flood's key population has reached its steady size (the
    worker's tables and pool have grown to it) and keys leave as fast as they come. With
    ``everything`` another one takes every record, as a recorder would, so the flood's first
    records must be built and sent too.
    """
    sub = start_subscriber(daemon.publish, "px1s.L", measure_latency=True, warmup_s=0.5)
    steady = start_subscriber(daemon.publish, "px1s.L", measure_latency=True, warmup_s=steady_after_s)
    recorder = start_subscriber(daemon.publish, "") if everything else None
    before = daemon_keys(daemon)
    targets: list[tuple[Any, tuple[Any, ...]]] = [(live_main, (daemon.ingests[0],))]
    if flood_rate is not None:
        targets.append((flood_main, (daemon.ingests[-1], first_key, 10**12, flood_rate)))

    def arrange(generators: list[Generator]) -> None:
        live = [generators[0].process.pid, *(p.pid for p in sub.processes + steady.processes)]
        flood = [g.process.pid for g in generators[1:]]
        if recorder is not None:
            flood += [p.pid for p in recorder.processes]
        placement.arrange(daemon, live, flood)

    generators = start_generators(targets, arrange)
    started = time.monotonic()
    time.sleep(steady_after_s)
    steady_drains, steady_started = Drains.read(daemon.scrape()), time.monotonic()
    time.sleep(seconds - steady_after_s)
    mid = daemon_keys(daemon)
    steady_drains = Drains.read(daemon.scrape()) - steady_drains
    steady_s = time.monotonic() - steady_started
    elapsed = time.monotonic() - started
    stop_generators(generators)
    daemon.wait_idle(60)
    time.sleep(0.2)  # the last records cross the forwarder
    [report] = finish(sub, 1)
    [steady_report] = finish(steady, 1)
    if recorder is not None:
        finish(recorder, 1)
    live_sent = generators[0].sent.value
    flood_sent = generators[1].sent.value if flood_rate is not None else 0
    new_keys = (mid["routed"] + mid["released"]) - (before["routed"] + before["released"])
    p50, p99 = hdr_quantiles(report["hdr"], (0.5, 0.99))
    steady_p50, steady_p99 = hdr_quantiles(steady_report["hdr"], (0.5, 0.99))
    return {
        "new_keys_per_s": new_keys / elapsed,
        "flood_sent": flood_sent,
        "live_records_per_tick": report["messages"] / max(live_sent, 1),
        "live_sent_per_s": live_sent / elapsed,
        "p50_ms": p50 / 1e6,
        "p99_ms": p99 / 1e6,
        "steady_p50_ms": steady_p50 / 1e6,
        "steady_p99_ms": steady_p99 / 1e6,
        "busy": (mid["busy"] - before["busy"]) / elapsed,
        "shed_per_s": (mid["shed"] - before["shed"]) / elapsed,
        "steady_hdr": steady_report["hdr"],
        "steady_drains": steady_drains,
        "steady_s": steady_s,
    }


def new_key_rate(seconds: float, own_endpoint: bool = False, isolate: bool = False) -> tuple[Table, Table]:
    """With ``own_endpoint`` the flood comes in on an endpoint (so an ingest process) of its own;
    with ``isolate`` every phase also runs under the :data:`ISOLATED` placement, interleaved."""
    where = "the flood on an endpoint of its own, 2 ingests" if own_endpoint else "1 ingest"
    table = Table(
        f"New keys per second through one ingest, {LIVE_KEYS} live keys beside them at {LIVE_TICKS_PER_S:,} ticks/s "
        f'({where}, 1 worker, built-in 3 signals, key_ttl = "2s"; {seconds:g} s per phase, interleaved)',
        [
            "phase",
            "new keys/s",
            "shed/s",
            "live sent/s",
            "live records per tick",
            "live p50 (ms)",
            "live p99 (ms)",
            "p99 vs alone",
            "steady p50 / p99 (ms)",
            "steady p99 vs alone",
            "worker busy",
        ],
    )
    extra = '[state]\nkey_ttl = "2s"\nmax_keys = 10000000\n'
    daemon = Daemon(1, SignalOptions(), endpoints=2 if own_endpoint else 1, extra_toml=extra)
    daemon.start()
    workloads = (
        ("live keys alone", None, False),
        ("flood, as fast as taken", 0.0, False),
        (PACED_PHASE, PACED, False),
        ("paced at 200k/s, a recorder on every record", PACED, True),
    )
    placements: tuple[Placement, ...] = (SHARED,)
    if isolate:
        placements = (SHARED, ISOLATED, FLOOD_INGEST_BY_WORKER) if own_endpoint else (SHARED, ISOLATED)
    phases: dict[tuple[str, Placement], list[dict[str, Any]]] = {(w[0], p): [] for w in workloads for p in placements}
    try:
        first = 0
        for _ in range(2):
            for name, rate, everything in workloads:
                for placement in placements:
                    result = live_phase(daemon, seconds, rate, first, everything=everything, placement=placement)
                    first += result["flood_sent"]
                    phases[name, placement].append(result)
    finally:
        daemon.stop()
    numbers = [key for key, value in phases["live keys alone", SHARED][0].items() if isinstance(value, float | int)]
    for (name, placement), results in phases.items():
        alone = {k: float(np.median([r[k] for r in phases["live keys alone", placement]])) for k in numbers}
        med = {k: float(np.median([r[k] for r in results])) for k in numbers}
        table.add(
            name + placement.name,
            f"{med['new_keys_per_s']:,.0f}",
            f"{med['shed_per_s']:,.0f}",
            f"{med['live_sent_per_s']:,.0f}",
            f"{med['live_records_per_tick']:.1%}",
            f"{med['p50_ms']:.2f}",
            f"{med['p99_ms']:.2f}",
            f"{med['p99_ms'] / alone['p99_ms']:.2f}x",
            f"{med['steady_p50_ms']:.2f} / {med['steady_p99_ms']:.2f}",
            f"{med['steady_p99_ms'] / alone['steady_p99_ms']:.2f}x",
            f"{med['busy']:.0%}",
        )
    table.notes.append("new keys/s: keys the ingest started routing per second (streamd_ingest_keys + released)")
    table.notes.append("shed/s: ticks of new keys dropped as new_key_backlog (the workers had no room for them)")
    table.notes.append(
        "live latency: subscriber receive wall clock - send wall clock, px1s records of live keys, from 0.5 s into "
        "the phase; steady: from 4.5 s on (2 key_ttl), once the flood's key population has stopped growing: before "
        "that, the worker's tables and tick pool grow to it (first touches of new memory, a few pages per batch)"
    )
    table.notes.append(
        "a recorder on every record: a second subscriber on all topics, so the flood's first records are built and "
        "sent; without one, records nobody subscribes to are skipped by the worker"
    )
    table.notes.append(
        "live records per tick: px1s records of live keys received by the time the daemon was idle, per live tick "
        "sent; a batch publishes one record per key it touched, so this falls as a busy worker's batches grow"
    )
    if isolate:
        table.notes.append(
            "[isolated]: the worker alone on core 0; the flood's ingest, generator and recorder at nice 19 on core 1 "
            "beside the live feed, live ingest, forwarder and subscriber; p99 is compared with the live keys alone "
            "under the same placement"
        )
        table.notes.append(
            "[isolated, flood ingest on core 0]: the same, but the flood's ingest (nice 19) shares the worker's core, "
            "so the live path's core carries only the flood's generator: what is left of the slowdown is the worker's"
        )
    table.data = {
        name + placement.name: [{k: r[k] for k in numbers} for r in results]
        for (name, placement), results in phases.items()
    }
    return table, with_more_workers(phases, placements)


def with_more_workers(
    phases: dict[tuple[str, Placement], list[dict[str, Any]]], placements: tuple[Placement, ...]
) -> Table:
    """:func:`predicted_live_latency` for the paced flood over 1 to 16 workers, from the steady part
    of the phases (both rounds pooled), next to what one worker measured."""
    table = Table(
        f"With more workers (predicted): the flood paced at {PACED:,.0f} new keys/s spread over N workers by "
        "shard_for, each worker on a core of its own; the live keys' latency once the flood's population is steady",
        [
            "workers",
            "new keys/s per worker",
            "worker time in flood drains",
            "live p50 (ms)",
            "live p99 (ms)",
            "p99 vs alone",
        ],
    )
    for placement in placements:
        alone = sum(r["steady_hdr"] for r in phases["live keys alone", placement])
        paced = phases[PACED_PHASE, placement]
        drains = sum((r["steady_drains"] for r in paced[1:]), paced[0]["steady_drains"])
        elapsed = sum(r["steady_s"] for r in paced)
        rate = float(np.median([r["new_keys_per_s"] for r in paced]))  # below PACED where its ingest starves
        alone_p50, alone_p99 = hdr_quantiles(alone, (0.5, 0.99))
        table.add(
            f"live keys alone, measured{placement.name}",
            "",
            "",
            f"{alone_p50 / 1e6:.2f}",
            f"{alone_p99 / 1e6:.2f}",
            "1.00x",
        )
        measured = sum(r["steady_hdr"] for r in paced)
        p50, p99 = hdr_quantiles(measured, (0.5, 0.99))
        table.add(
            f"1, measured{placement.name}",
            f"{rate:,.0f}",
            f"{drains.seconds / elapsed:.1%}",
            f"{p50 / 1e6:.2f}",
            f"{p99 / 1e6:.2f}",
            f"{p99 / alone_p99:.2f}x",
        )
        for workers in (1, 2, 4, 8, 16):
            p50, p99 = predicted_live_latency(alone, drains, elapsed, workers)
            table.add(
                f"{workers}, predicted{placement.name}",
                f"{rate / workers:,.0f}",
                f"{drains.seconds / elapsed / workers:.1%}",
                f"{p50 / 1e6:.2f}",
                f"{p99 / 1e6:.2f}",
                f"{p99 / alone_p99:.2f}x",
            )
    table.notes.append(
        "model: a live batch that reaches its worker during a drain that announced or released keys waits for the "
        "rest of it, with probability the worker's time in such drains (divided by N); drain lengths are those "
        "measured with one worker (streamd_worker_apply_seconds{keys=new_or_gone}, fine buckets), which overstates "
        "them for N > 1; the rest is the live keys' latency alone, measured in the same run"
    )
    table.notes.append(
        "the 1-worker prediction leaves out what this box adds: the flood's generator and ingest take turns on the "
        "cores the live path uses; the gap between it and the measurement is that share"
    )
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.keyflood", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1.2 M keys and shorter phases (validation)")
    parser.add_argument("--only", choices=("memory", "rate", "admission"), help="run one of the parts")
    parser.add_argument(
        "--flood-endpoint", choices=("shared", "own"), default="shared", help="rate: the flood's endpoint (and ingest)"
    )
    parser.add_argument(
        "--isolate", action="store_true", help="rate: also run each phase with the worker on a core of its own"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tables = []
    if args.only in (None, "memory"):
        total, rate = (1_200_000, 40_000.0) if args.quick else (10_000_000, 100_000.0)
        tables.append(memory_under_flood(total, rate, 10.0))
        tables.append(eviction_cost(100_000 if args.quick else 1_000_000))
        print_tables(tables[-2:])
    if args.only in (None, "admission"):
        tables.append(admission_cost())
        print_tables(tables[-1:])
    if args.only in (None, "rate"):
        tables += new_key_rate(8.0 if args.quick else 15.0, args.flood_endpoint == "own", args.isolate)
        print_tables(tables[-2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
