"""Shared by the daemon, latency and scaling sections: the daemon in its own session, /metrics,
paced load generators, subscribers and the raw transport ceiling, each in its own process.

Load generators pre-encode their payloads once and only stamp the event time into them before each
send (a fixed-width msgpack uint64 for map and list forms, the little-endian ``t`` buffer for the
bin form), so the generator's cost per message is a few bytes of patching plus ``send``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq
from prometheus_client.parser import text_string_to_metric_families

from bench.ticks import feed_part, generate, symbols
from streamd.protocol import encode_columnar_bin
from tests.helpers import free_port, start_daemon

CONTEXT = mp.get_context("spawn")
_MARK = 2**63 + 0x5EED  # encodes as msgpack uint64 (0xcf + 8 bytes): a fixed-width slot to stamp into
_MARK_BYTES = b"\xcf" + _MARK.to_bytes(8, "big")
COLUMNAR_BATCH = 1_000
ROLES = ("ingest", "worker", "supervisor")  # the role label of streamd_process_cpu_seconds_total


# -- the daemon -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SignalOptions:
    """How the built-in three signals publish: ``publish`` mode and optional ``emit_interval``."""

    publish: str = "record"
    emit_interval: str | None = None

    def describe(self) -> str:
        interval = f', emit_interval = "{self.emit_interval}"' if self.emit_interval else ""
        return f'publish = "{self.publish}"{interval}'


BUILTIN_SIGNALS = (
    ("px1s", "time", '"1s"', ["count", "mean", "std", "min", "max", "vwap", "last", "zscore"]),
    ("mean100", "count", "100", ["mean", "std"]),
    ("ewma1s", "ewma", '"1s"', ["ewma"]),
)


def config_text(
    ingests: list[str], publish: str, metrics: str, workers: int, options: SignalOptions, max_batch_delay: str = "1ms"
) -> str:
    """A daemon config: the built-in signals with the given publishing options."""
    lines = [
        "[ingest]",
        "endpoints = [" + ", ".join(f'"{endpoint}"' for endpoint in ingests) + "]",
        "[latency]",
        f'max_batch_delay = "{max_batch_delay}"',
        "[workers]",
        f"count = {workers}",
        "[publish]",
        f'endpoint = "{publish}"',
        "[metrics]",
        f'listen = "{metrics}"',
        "[log]",
        'level = "warning"',
    ]
    for name, window, size, stats in BUILTIN_SIGNALS:
        lines += [
            "[[signal]]",
            f'name = "{name}"',
            f'window = "{window}"',
            f"size = {size}",
            "stats = [" + ", ".join(f'"{s}"' for s in stats) + "]",
            f'publish = "{options.publish}"',
        ]
        if options.emit_interval:
            lines.append(f'emit_interval = "{options.emit_interval}"')
    return "\n".join(lines) + "\n"


class Metrics(dict[tuple[str, tuple[tuple[str, str], ...]], float]):
    """One /metrics scrape, by sample name and sorted labels."""

    def total(self, name: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(v for (n, lab), v in self.items() if n == name and want <= set(lab))

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """Cumulative (upper bound, count) of a histogram summed over the label sets that have ``labels``."""
        want = set(labels.items())
        bounds: dict[float, float] = {}
        for (n, lab), value in self.items():
            if n == f"{name}_bucket" and want <= set(lab):
                le = float(dict(lab)["le"])
                bounds[le] = bounds.get(le, 0.0) + value
        return sorted(bounds.items())


def parse_metrics(text: str) -> Metrics:
    metrics = Metrics()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            metrics[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return metrics


@dataclass
class Daemon:
    """``python -m streamd run --config FILE`` in its own session, as its systemd unit runs it."""

    workers: int
    options: SignalOptions
    max_batch_delay: str = "1ms"
    endpoints: int = 1
    ingests: list[str] = field(default_factory=list)
    extra_toml: str = ""  # appended to the config, e.g. a [state] table
    publish: str = ""
    metrics_url: str = ""
    process: subprocess.Popen[bytes] | None = None
    workdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="streamd-bench-"))

    def start(self, timeout: float = 30.0) -> None:
        self.ingests = [f"tcp://127.0.0.1:{free_port()}" for _ in range(self.endpoints)]
        self.publish = f"tcp://127.0.0.1:{free_port()}"
        metrics = f"127.0.0.1:{free_port()}"
        self.metrics_url = f"http://{metrics}/metrics"
        path = Path(self.workdir) / "streamd.toml"
        path.write_text(
            config_text(self.ingests, self.publish, metrics, self.workers, self.options, self.max_batch_delay)
            + self.extra_toml
        )
        self.process = start_daemon(path, Path(self.workdir) / "streamd.log", own_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                msg = f"streamd exited with {self.process.returncode} at start-up: {self.log_tail()}"
                raise RuntimeError(msg)
            try:
                if self.scrape().total("streamd_worker_up") >= self.workers:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        msg = f"streamd not ready within {timeout} s: {self.log_tail()}"
        raise RuntimeError(msg)

    def log_tail(self, lines: int = 8) -> str:
        path = Path(self.workdir) / "streamd.log"
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def scrape(self) -> Metrics:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return parse_metrics(response.read().decode())

    def counts(self) -> dict[str, float]:
        m = self.scrape()
        return {
            "received": m.total("streamd_ticks_received_total"),
            "processed": m.total("streamd_ticks_processed_total"),
            "dropped": m.total("streamd_ticks_dropped_total"),
            "backlog": m.total("streamd_worker_backlog_ticks"),
            **{f"cpu_{role}": m.total("streamd_process_cpu_seconds_total", role=role) for role in ROLES},
        }

    def wait_received(self, total: float, timeout: float) -> bool:
        """Until ``streamd_ticks_received_total`` reaches ``total`` (or the timeout)."""
        deadline = time.monotonic() + timeout
        while self.scrape().total("streamd_ticks_received_total") < total:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def wait_idle(self, timeout: float) -> tuple[bool, dict[str, float]]:
        """Until received == processed + dropped and no backlog (or the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.counts()
            if counts["received"] == counts["processed"] + counts["dropped"] and counts["backlog"] == 0:
                return True, counts
            if time.monotonic() > deadline:
                return False, counts
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the daemon's whole process group (its own session): after an overload probe,
        a graceful drain of deep queues would only cost time."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def stop(self) -> None:
        """SIGTERM (graceful drain), then SIGKILL to the daemon's own process group if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


@contextmanager
def running_daemon(
    workers: int, options: SignalOptions, max_batch_delay: str = "1ms", endpoints: int = 1
) -> Iterator[Daemon]:
    daemon = Daemon(workers, options, max_batch_delay, endpoints)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(daemon.workdir, ignore_errors=True)


# -- payloads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Feed:
    """What load generators send: wire ``form``, number of ``keys``, their distribution and type.

    ``form``: ``map`` (one tick ``{"k","t","p","q"}`` per message), ``list`` (columnar batch with
    list columns) or ``bin`` (columnar batch with little-endian bin columns). ``key_type``:
    ``str`` (symbols, the headline) or ``int`` (dense integer ids, a labelled variant only).
    """

    form: str
    keys: int
    uniform: bool = False
    key_type: str = "str"

    @property
    def ticks_per_message(self) -> int:
        return 1 if self.form == "map" else COLUMNAR_BATCH

    def label(self) -> str:
        shape = "single-tick maps" if self.form == "map" else f"columnar {self.form}, {COLUMNAR_BATCH:,}/msg"
        keys = "string" if self.key_type == "str" else "INTEGER"
        return f"{shape}; {self.keys:,} {keys} keys, {'uniform' if self.uniform else 'Zipf'}"


class Payloads:
    """Pre-encoded messages of one :class:`Feed` with a stamp slot for the event time.

    ``part``/``parts`` keep only the keys whose :func:`bench.ticks.feed_part` is ``part``, so
    that several generators (and several ingest endpoints) never share a key and event time
    stays monotonic per key.
    """

    def __init__(self, feed: Feed, part: int = 0, parts: int = 1, n_ticks: int = 200_000) -> None:
        ticks = generate(n_ticks, feed.keys, seed=1234, uniform=feed.uniform)
        key_of_id = symbols(feed.keys) if feed.key_type == "str" else np.arange(feed.keys)
        part_of_id = np.array([feed_part(k, parts) for k in key_of_id.tolist()], np.int64)
        mine = part_of_id[ticks.keys] == part
        keys = key_of_id[ticks.keys[mine]].tolist()
        p, q = ticks.p[mine].tolist(), ticks.q[mine].tolist()
        self.form = feed.form
        self.ticks_per_message = feed.ticks_per_message
        self.templates: list[Any] = []
        self.offsets: list[int] = []
        if feed.form == "map":
            for key, price, qty in zip(keys, p, q, strict=True):
                packed = msgpack.packb({"k": key, "t": _MARK, "p": price, "q": qty})
                at = packed.index(_MARK_BYTES) + 1
                self.templates.append((packed[:at], packed[at + 8 :]))
            return
        for start in range(0, len(keys) - COLUMNAR_BATCH + 1, COLUMNAR_BATCH):
            chunk = slice(start, start + COLUMNAR_BATCH)
            if feed.form == "bin":
                marks = np.full(COLUMNAR_BATCH, 0x5EED5EED5EED5EED, np.int64)
                packed = encode_columnar_bin(keys[chunk], marks, p[chunk], q[chunk])
                at = packed.index(marks.tobytes())
            elif feed.form == "list":
                packed = msgpack.packb({"k": keys[chunk], "t": [_MARK] * COLUMNAR_BATCH, "p": p[chunk], "q": q[chunk]})
                at = packed.index(_MARK_BYTES) + 1
            else:
                msg = f"unknown payload form {feed.form!r}"
                raise ValueError(msg)
            self.templates.append(bytearray(packed))
            self.offsets.append(at)
        self.views = [self._view(buf, at) for buf, at in zip(self.templates, self.offsets, strict=True)]

    def _view(self, buf: bytearray, at: int) -> np.ndarray:
        if self.form == "bin":
            return np.ndarray(COLUMNAR_BATCH, np.dtype("<i8"), buffer=buf, offset=at)
        return np.ndarray(COLUMNAR_BATCH, np.dtype(">u8"), buffer=buf, offset=at, strides=(9,))

    def __len__(self) -> int:
        return len(self.templates)

    def stamped(self, index: int, t_ns: int) -> bytes | bytearray:
        """Message ``index`` (cyclic) with every tick's event time set to ``t_ns``."""
        if self.form == "map":
            head, tail = self.templates[index % len(self.templates)]
            message: bytes = head + struct.pack(">Q", t_ns) + tail
            return message
        i = index % len(self.templates)
        self.views[i][:] = t_ns
        template: bytearray = self.templates[i]
        return template


# -- processes: generator, raw receiver, subscriber ------------------------------------------


@dataclass(frozen=True)
class EventClock:
    """Event times on a schedule: message ``i`` of the whole feed happens at ``start_ns + i / msgs_per_s``.

    Without it a message is stamped when it is sent. Under back-pressure that packs event times:
    a PUSH sender blocked at its high-water mark is let go only once the receiver has taken half
    of its queue (ZeroMQ's low-water mark), and then sends a burst stamped within milliseconds.
    A real feed's ticks happen at their own rate whatever the receiver does, which is what this
    models; a 1 s window over it holds one second of the feed's ticks.
    """

    start_ns: int
    msgs_per_s: float  # of the whole feed, across its generators

    def end_ns(self, messages: int) -> int:
        return self.start_ns + int(messages * 1e9 / self.msgs_per_s)


def generator_main(
    endpoint: str,
    feed: Feed,
    part: int,
    parts: int,
    msgs_per_s: float,
    duration: float,
    ready: Any,
    go: Any,
    results: Any,
    clock: EventClock | None = None,
) -> None:
    """PUSH pre-encoded payloads at ``msgs_per_s`` (0 = as fast as possible) for ``duration`` s.

    Paced by a schedule (message i is due at ``i / rate``), not by sleeps per message, so the
    offered rate holds on average even when the OS delays us; a blocked ``send`` (the receiver's
    high-water mark) shows up as an achieved rate below the offered one. Messages are stamped
    when sent, or on ``clock`` (generator ``part`` takes every ``parts``-th message of it).
    """
    payloads = Payloads(feed, part, parts)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.LINGER, 2_000)
    sock.connect(endpoint)
    ready.set()
    go.wait()
    now_ns = time.time_ns
    if clock is not None:
        step_ns = 1e9 * parts / clock.msgs_per_s
        first_ns = clock.start_ns + 1e9 * part / clock.msgs_per_s

        def event_ns(i: int) -> int:
            return int(first_ns + i * step_ns)

    send = sock.send
    stamped = payloads.stamped
    sent = 0
    cpu_start = time.process_time()
    start = time.perf_counter()
    end = start + duration
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        due = int((now - start) * msgs_per_s) if msgs_per_s else sent + 256
        if due <= sent:
            time.sleep(min(0.0002, (sent + 1) / msgs_per_s - (now - start)))
            continue
        for i in range(sent, min(due, sent + 2_000)):
            send(stamped(i, now_ns() if clock is None else event_ns(i)))
        sent = min(due, sent + 2_000)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    sock.close()
    ctx.term()
    ticks = sent * payloads.ticks_per_message
    results.put({"part": part, "messages": sent, "ticks": ticks, "elapsed": elapsed, "cpu_s": cpu})


def raw_receiver_main(endpoint: str, decode: bool, ready: Any, stop: Any, results: Any) -> None:
    """PULL and count messages and bytes, and with ``decode`` also ``msgpack.unpackb`` each one.

    Without decoding this is the transport's ceiling; with it, the floor cost of any receiver
    that must look at the ticks (no validation, no batching, no compute).
    """
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.bind(endpoint)
    ready.set()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    messages = size = 0
    first = last = 0.0
    recv, unpackb = sock.recv, msgpack.unpackb
    while not stop.is_set():
        if not poller.poll(100):
            continue
        if not messages:
            first = time.perf_counter()
        try:
            while True:
                payload = recv(zmq.NOBLOCK)
                if decode:
                    unpackb(payload)
                size += len(payload)
                messages += 1
        except zmq.Again:
            last = time.perf_counter()
    sock.close(linger=0)
    ctx.term()
    results.put({"messages": messages, "bytes": size, "elapsed": max(last - first, 1e-9)})


def hdr_index(values_ns: np.ndarray, sub_bits: int = 7) -> np.ndarray:
    """HDR-style log-linear bucket of each value: exact below 2**sub_bits ns, then 2**(sub_bits-1)
    linear sub-buckets per power of two (< 1.6% relative error)."""
    v = np.maximum(values_ns.astype(np.int64), 0)
    small = 1 << sub_bits
    exponent = np.frexp(np.maximum(v, 1).astype(np.float64))[1]  # bit length
    shift = np.maximum(exponent - sub_bits, 0)
    mantissa = v >> shift
    half = small >> 1
    return np.where(v < small, v, small + (shift - 1) * half + (mantissa - half))


def hdr_value(index: np.ndarray, sub_bits: int = 7) -> np.ndarray:
    """Upper edge of bucket ``index`` in ns (inverse of :func:`hdr_index`)."""
    small = 1 << sub_bits
    half = small >> 1
    index = np.asarray(index, np.int64)
    shift = np.where(index < small, 0, (index - small) // half + 1)
    mantissa = np.where(index < small, index, (index - small) % half + half)
    return ((mantissa + 1) << shift) - 1


def hdr_quantiles(counts: np.ndarray, quantiles: tuple[float, ...]) -> list[float]:
    """Quantiles (ns, bucket upper edge) of a bucket-count array."""
    total = counts.sum()
    if not total:
        return [float("nan")] * len(quantiles)
    cumulative = np.cumsum(counts)
    return [float(hdr_value(np.searchsorted(cumulative, q * total, side="left"))) for q in quantiles]


HDR_BUCKETS = 128 + 64 * 40


def subscriber_main(
    endpoint: str, topic: str, measure_latency: bool, warmup_s: float, ready: Any, stop: Any, results: Any
) -> None:
    """SUB to the daemon's output. Counts messages; with ``measure_latency`` decodes each record and
    puts ``recv wall clock - t`` (t = event time = the generator's send wall clock) into an HDR histogram."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    sock.connect(endpoint)
    ready.set()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    counts = np.zeros(HDR_BUCKETS, np.int64)
    messages = 0
    latencies: list[int] = []
    start_ns = time.time_ns() + int(warmup_s * 1e9)
    cpu_start = time.process_time()
    recv_multipart, now_ns, unpackb = sock.recv_multipart, time.time_ns, msgpack.unpackb
    while not stop.is_set():
        if not poller.poll(100):
            continue
        try:
            while True:
                frames = recv_multipart(zmq.NOBLOCK)
                messages += 1
                if measure_latency:
                    received = now_ns()
                    if received >= start_ns:
                        latencies.append(received - unpackb(frames[-1])["t"])
        except zmq.Again:
            pass
        if len(latencies) > 100_000:
            np.add.at(counts, hdr_index(np.array(latencies)), 1)
            latencies.clear()
    if latencies:
        np.add.at(counts, hdr_index(np.array(latencies)), 1)
    sock.close(linger=0)
    ctx.term()
    results.put({"messages": messages, "hdr": counts, "cpu_s": time.process_time() - cpu_start})


@dataclass
class Started:
    processes: list[Any]
    stop: Any
    results: Any


def start_subscriber(endpoint: str, topic: str = "", measure_latency: bool = False, warmup_s: float = 0.0) -> Started:
    ready, stop, results = CONTEXT.Event(), CONTEXT.Event(), CONTEXT.Queue()
    process = CONTEXT.Process(
        target=subscriber_main, args=(endpoint, topic, measure_latency, warmup_s, ready, stop, results)
    )
    process.start()
    ready.wait(30)
    time.sleep(0.3)  # let the subscription reach the publisher
    return Started([process], stop, results)


def finish(started: Started, expected: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    started.stop.set()
    out = [started.results.get(timeout=timeout) for _ in range(expected)]
    for process in started.processes:
        process.join(timeout)
        if process.is_alive():
            process.kill()
    return out


def offer_load(
    endpoints: list[str],
    feed: Feed,
    ticks_per_s: float,
    duration: float,
    generators_per_endpoint: int = 1,
    during: Any = None,
    clock: EventClock | None = None,
) -> dict[str, Any]:
    """Run paced PUSH processes together, ``generators_per_endpoint`` per endpoint, keys split between
    them by :func:`bench.ticks.feed_part` (generator ``i`` sends to endpoint ``i % len(endpoints)``);
    return the offered and achieved rates and the generators' CPU seconds. ``during()`` is called
    every 0.5 s while they run (for sampling). With ``clock``, ticks carry its event times."""
    parts = len(endpoints) * generators_per_endpoint
    msgs_per_s = ticks_per_s / feed.ticks_per_message / parts if ticks_per_s else 0.0
    go, results = CONTEXT.Event(), CONTEXT.Queue()
    processes, readies = [], []
    for part in range(parts):
        ready = CONTEXT.Event()
        endpoint = endpoints[part % len(endpoints)]
        process = CONTEXT.Process(
            target=generator_main,
            args=(endpoint, feed, part, parts, msgs_per_s, duration, ready, go, results, clock),
        )
        process.start()
        processes.append(process)
        readies.append(ready)
    for ready in readies:
        ready.wait(60)
    time.sleep(0.2)
    go.set()
    samples = []
    deadline = time.monotonic() + duration
    while during is not None and time.monotonic() < deadline - 0.25:
        time.sleep(0.5)
        samples.append(during())
    reports = [results.get(timeout=duration + 60) for _ in processes]
    for process in processes:
        process.join(30)
    ticks = sum(r["ticks"] for r in reports)
    elapsed = max(r["elapsed"] for r in reports)
    return {
        "offered": ticks_per_s,
        "ticks": ticks,
        "messages": sum(r["messages"] for r in reports),
        "achieved": ticks / elapsed,
        "elapsed": elapsed,
        "generator_cpu_s": sum(r["cpu_s"] for r in reports),
        "samples": samples,
    }


def raw_ceiling(
    feed: Feed, endpoints: int, duration: float, generators_per_endpoint: int = 1, decode: bool = False
) -> dict[str, float]:
    """Plain PUSH/PULL moving the same payloads as fast as possible into one receiver process per
    endpoint (counting only, or with ``decode`` also ``msgpack.unpackb`` of every message)."""
    addresses = [f"tcp://127.0.0.1:{free_port()}" for _ in range(endpoints)]
    stop, results = CONTEXT.Event(), CONTEXT.Queue()
    receivers = []
    for address in addresses:
        ready = CONTEXT.Event()
        receiver = CONTEXT.Process(target=raw_receiver_main, args=(address, decode, ready, stop, results))
        receiver.start()
        ready.wait(30)
        receivers.append(receiver)
    offer_load(addresses, feed, 0.0, duration, generators_per_endpoint)
    time.sleep(0.3)
    stop.set()
    reports = [results.get(timeout=30) for _ in receivers]
    for receiver in receivers:
        receiver.join(10)
    messages = sum(r["messages"] for r in reports)
    elapsed = max(r["elapsed"] for r in reports)
    return {
        "messages_per_s": messages / elapsed,
        "ticks_per_s": messages * feed.ticks_per_message / elapsed,
        "bytes_per_message": sum(r["bytes"] for r in reports) / max(messages, 1),
    }
