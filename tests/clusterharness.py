"""Three streamd instances over a 3-node NATS cluster: start, feed one, subscribe to all, kill, check.

Records are collected from every instance's ``publish.endpoint`` by one thread, stamped with
the instance and the order of arrival, so ownership can be checked on the output: for each
partition the fencing tokens seen in arrival order never go back, and each token is only
ever seen from one instance.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from streamd.config import load_config
from streamd.protocol import encode_columnar_bin
from tests.helpers import READY_LINE, Daemon, daemon_config, free_port, start_daemon, stop_process
from tests.oracle import expected_frame

SIGNALS = """
[[signal]]
name = "px1s"
window = "time"
size = "1s"
stats = ["count", "mean", "std", "min", "max", "vwap", "last"]

[[signal]]
name = "mean100"
window = "count"
size = 100
stats = ["mean", "std"]
publish = "batch"

[[signal]]
name = "ewma1s"
window = "ewma"
size = "1s"
stats = ["ewma"]
publish = "batch"

[[signal]]
name = "all"
window = "time"
size = "1h"
stats = ["count", "sum"]
"""


def instance_toml(servers: list[str], name: str, partitions: int, lease_ttl: str) -> str:
    urls = ", ".join(f'"{url}"' for url in servers)
    cluster = f"""
[cluster]
servers = [{urls}]
partitions = {partitions}
replicas = 3
name = "{name}"
lease_ttl = "{lease_ttl}"
"""
    return cluster + SIGNALS


def start_instance(tmp_path: Path, servers: list[str], name: str, partitions: int, lease_ttl: str) -> Daemon:
    """Start one instance (1 worker) on free ports; the caller waits for :func:`wait_ready`."""
    directory = tmp_path / name
    directory.mkdir(exist_ok=True)
    ingest = f"tcp://127.0.0.1:{free_port()}"
    publish = f"tcp://127.0.0.1:{free_port()}"
    metrics = f"127.0.0.1:{free_port()}"
    config_path = directory / "streamd.toml"
    extra = instance_toml(servers, name, partitions, lease_ttl)
    config_path.write_text(daemon_config([ingest], publish, metrics, 1, extra))
    log_path = directory / "streamd.log"
    proc = start_daemon(config_path, log_path)
    return Daemon(proc, ingest, publish, metrics, config_path, log_path, [ingest])


def wait_ready(daemon: Daemon) -> None:
    daemon.wait_for(lambda: READY_LINE in daemon.log(), 40, "the ready log line")


def kill_instance(daemon: Daemon) -> None:
    """kill -9 of the supervisor and every child at the same moment: no goodbye to anyone."""
    pids = [*daemon.children(), daemon.proc.pid]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    daemon.proc.wait(10)


@dataclass
class Row:
    """One published row, flattened from record or batch mode."""

    instance: str
    arrival: int  # order of arrival over all instances
    received: float  # monotonic time it arrived
    signal: str
    key: str
    t: int
    values: dict[str, Any]


@dataclass
class Collector:
    """One thread reads every instance's PUB endpoint and keeps rows in arrival order."""

    ctx: zmq.Context[Any] = field(default_factory=zmq.Context)
    rows: list[Row] = field(default_factory=list)
    _sockets: dict[str, zmq.Socket[Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def add(self, name: str, endpoint: str) -> None:
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(endpoint)
        with self._lock:
            self._sockets[name] = sock

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                sockets = dict(self._sockets)
            poller = zmq.Poller()
            for sock in sockets.values():
                poller.register(sock, zmq.POLLIN)
            ready = dict(poller.poll(50))
            for name, sock in sockets.items():
                if sock in ready:
                    self._read(name, sock)

    def _read(self, name: str, sock: zmq.Socket[Any]) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            record = msgpack.unpackb(frames[-1], strict_map_key=False)
            now = time.monotonic()
            with self._lock:
                for row in _flatten(record):
                    self.rows.append(Row(name, len(self.rows), now, record["signal"], *row))

    def snapshot(self) -> list[Row]:
        with self._lock:
            return list(self.rows)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for sock in self._sockets.values():
            sock.close(0)
        self.ctx.term()


def _flatten(record: dict[str, Any]) -> list[tuple[str, int, dict[str, Any]]]:
    if isinstance(record["k"], list):
        fields = [name for name in record if name not in ("signal", "pub_ns", "k", "t")]
        pairs = enumerate(zip(record["k"], record["t"], strict=True))
        return [(k, t, {name: record[name][i] for name in fields}) for i, (k, t) in pairs]
    return [(record["k"], record["t"], {n: v for n, v in record.items() if n not in ("signal", "pub_ns", "k", "t")})]


@dataclass
class Feed:
    """Columnar batches of in-order ticks into one ingest at about ``rate`` ticks/s, all of them kept."""

    endpoint: str
    keys: list[str]
    rate: int = 20_000
    batch: int = 100
    seed: int = 0
    sent: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.connect(self.endpoint)
        rng = np.random.default_rng(self.seed)
        last = 0
        pause = self.batch / self.rate
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                n = self.batch
                start = max(time.time_ns(), last + 1)
                t = start + np.arange(n, dtype=np.int64) * 1000
                last = int(t[-1])
                keys = np.array(self.keys, dtype=object)[rng.integers(0, len(self.keys), n)]
                p = np.round(100 + rng.normal(0, 1, n), 4)
                q = rng.integers(0, 5, n).astype(float)
                sock.send(encode_columnar_bin(keys.tolist(), t, p, q))
                self.sent.append((keys, t, p, q))
                next_at += pause
                time.sleep(max(0.0, next_at - time.monotonic()))
        finally:
            sock.close()
            ctx.term()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def ticks(self) -> int:
        return sum(len(part[1]) for part in self.sent)

    def by_key(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        keys, t, p, q = (np.concatenate(column) for column in zip(*self.sent, strict=True))
        order = np.argsort(keys.astype(str), kind="stable")
        keys, t, p, q = keys[order], t[order], p[order], q[order]
        unique, starts = np.unique(keys.astype(str), return_index=True)
        bounds = [*starts.tolist(), len(keys)]
        return {str(k): (t[a:b], p[a:b], q[a:b]) for k, a, b in zip(unique, bounds[:-1], bounds[1:], strict=True)}


def check_rows_exact(rows: list[Row], feed: Feed, config_path: Path) -> int:
    """Every row equals the pandas reference at its key and time; vectorised per (signal, key)."""
    specs = {s.name: s for s in load_config(config_path).signals}
    ticks = feed.by_key()
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        groups[row.signal, row.key].append(row)
    for (name, key), group in groups.items():
        spec = specs[name]
        t, p, q = ticks[key]
        frame = expected_frame(t, p, q, spec)
        at = np.array([row.t for row in group], np.int64)
        index = np.searchsorted(t, at)
        assert (index < len(t)).all() and (t[np.minimum(index, len(t) - 1)] == at).all(), f"{name}.{key}: unknown t"
        for stat in spec.stats:
            got = np.array([np.nan if row.values[stat] is None else row.values[stat] for row in group], float)
            want = frame[stat].to_numpy()[index]
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9, err_msg=f"{name}.{key}.{stat}")
    return len(rows)


def check_final_rows_cover_everything(rows: list[Row], feed: Feed) -> None:
    """The last ``all`` row of every key is at its last tick and counts every tick sent for it."""
    last: dict[str, Row] = {}
    for row in rows:
        if row.signal == "all" and (row.key not in last or row.t > last[row.key].t):
            last[row.key] = row
    for key, (t, _, _) in feed.by_key().items():
        assert key in last, f"no record at all for {key}"
        assert last[key].t == t[-1], f"{key}: last record at {last[key].t}, last tick at {t[-1]}"
        assert last[key].values["count"] == len(t), f"{key}: count {last[key].values['count']} of {len(t)} ticks"


def check_fencing(rows: list[Row]) -> dict[int, list[int]]:
    """Per partition, tokens in arrival order never go back, and each token comes from one instance."""
    seen: dict[int, list[int]] = defaultdict(list)
    owner: dict[tuple[int, int], str] = {}
    for row in rows:
        part, fence = row.values["part"], row.values["fence"]
        history = seen[part]
        assert not history or fence >= history[-1], f"partition {part}: token {fence} after {history[-1]}"
        if not history or fence != history[-1]:
            history.append(fence)
        assert owner.setdefault((part, fence), row.instance) == row.instance, f"partition {part} token {fence}"
    return dict(seen)


def wait_until(predicate: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            msg = f"timed out after {timeout} s waiting for {what}"
            raise AssertionError(msg)
        time.sleep(0.05)
    return time.monotonic() - started


@contextlib.contextmanager
def instances(
    tmp_path: Path, servers: list[str], names: list[str], partitions: int = 12, lease_ttl: str = "2s"
) -> Iterator[dict[str, Daemon]]:
    """Start instances in parallel, wait until each is ready, always stop (or kill) all of them."""
    started = {name: start_instance(tmp_path, servers, name, partitions, lease_ttl) for name in names}
    try:
        for daemon in started.values():
            wait_ready(daemon)
        yield started
    finally:
        for daemon in started.values():
            stop_process(daemon.proc, 15)
            daemon.ctx.destroy(0)
