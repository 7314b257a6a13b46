"""Real daemons on free ports for tests: start, feed, subscribe, scrape, and always clean up."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from streamd.protocol import encode_columnar_bin

READY_LINE = "streamd ready"


_PORTS_PER_XDIST_WORKER = 3000
_ports_given: set[int] = set()


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1, never handed out twice in this session.

    Taken below the kernel's ephemeral range (32768 and up), where the outgoing connections of the
    daemons and nats-servers under test would otherwise take a port between its choice and its
    bind; each pytest-xdist worker has its own slice, so two workers never choose the same one.
    """
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    low = 20000 + (worker % 4) * _PORTS_PER_XDIST_WORKER
    for port in random.sample(range(low, low + _PORTS_PER_XDIST_WORKER), _PORTS_PER_XDIST_WORKER):
        if port in _ports_given:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_given.add(port)
        return port
    msg = f"no free port left in {low}-{low + _PORTS_PER_XDIST_WORKER}"
    raise RuntimeError(msg)


def parse_metrics(text: str) -> dict[str, float]:
    """Exposition text to ``{'name{labels}': value}`` (comments dropped)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    ingest: str
    publish: str
    metrics_address: str
    config_path: Path
    log_path: Path
    ingests: list[str] = field(default_factory=list)  # every input endpoint; ``ingest`` is the first
    ctx: zmq.Context[Any] = field(default_factory=zmq.Context)

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_address}/metrics"

    def scrape(self) -> dict[str, float]:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return parse_metrics(response.read().decode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float:
        """Sum of every sample whose name (with labels) starts with ``name``."""
        return sum(v for k, v in self.scrape().items() if k == name or k.startswith(name + "{"))

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                msg = f"daemon exited ({self.proc.returncode}) while waiting for {what}:\n{self.log()[-3000:]}"
                raise AssertionError(msg)
            time.sleep(0.05)
        msg = f"timed out waiting for {what}:\n{self.log()[-3000:]}"
        raise AssertionError(msg)

    def wait_idle(self, timeout: float = 20.0) -> dict[str, float]:
        """Wait until received == processed + dropped holds and stays put; return that scrape."""
        last: dict[str, float] = {}

        def settled() -> bool:
            nonlocal last
            samples = self.scrape()
            steady = accounting(samples) == 0 and samples.get("streamd_ticks_received_total") == last.get(
                "streamd_ticks_received_total"
            )
            last = samples
            return steady

        try:
            self.wait_for(settled, timeout, "the pipeline to go idle with the accounting identity holding")
        except AssertionError as exc:
            books = {k: v for k, v in last.items() if k.startswith(("streamd_ticks_", "streamd_worker_backlog"))}
            msg = f"{exc}\nlast scrape: {books}"
            raise AssertionError(msg) from None
        return last

    def children(self) -> list[int]:
        """PIDs of the supervisor's child processes."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    pids.append(int(entry.name))
        return pids

    def worker_pids(self) -> list[int]:
        return [pid for pid in self.children() if _comm(pid).startswith("streamd-worker")]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return ""


def accounting(samples: dict[str, float]) -> float:
    """received - processed - dropped: zero when every tick is accounted for."""

    def total(name: str) -> float:
        return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))

    return (
        total("streamd_ticks_received_total")
        - total("streamd_ticks_processed_total")
        - total("streamd_ticks_dropped_total")
    )


def daemon_config(
    ingest: str | list[str],
    publish: str,
    metrics: str,
    workers: int,
    extra_toml: str,
    ingest_toml: str = "",
    workers_toml: str = "",
) -> str:
    endpoints = ", ".join(f'"{e}"' for e in ([ingest] if isinstance(ingest, str) else ingest))
    return f"""
[ingest]
endpoints = [{endpoints}]
{ingest_toml}
[publish]
endpoint = "{publish}"
[metrics]
listen = "{metrics}"
[workers]
count = {workers}
{workers_toml}
[shutdown]
graceful_timeout = "5s"
{extra_toml}
"""


def start_daemon(config_path: Path, log_path: Path, *args: str, own_session: bool = False) -> subprocess.Popen[bytes]:
    """``python -m streamd run --config FILE``, output appended to ``log_path``: the one starter that
    tests and bench/ share.

    ``STREAMD_*`` variables of the caller's shell are left out, so only the config file and ``args``
    decide. ``own_session`` starts it in a new session, as systemd does: the benchmarks need that so
    the kernel's autogroup shares CPU between the daemon and the load generators as in production.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_")} | {"PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "streamd", "run", "--config", str(config_path), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=own_session,
        )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@contextlib.contextmanager
def running_daemon(
    tmp_path: Path,
    *,
    workers: int = 2,
    extra_toml: str = "",
    ingest: str | None = None,
    ingest_toml: str = "",
    ingests: int = 1,
    workers_toml: str = "",
) -> Iterator[Daemon]:
    """Start ``streamd run`` on free ports (``ingests`` input endpoints), wait until ready, always stop it."""
    endpoints = [ingest or f"tcp://127.0.0.1:{free_port()}"] + [
        f"tcp://127.0.0.1:{free_port()}" for _ in range(ingests - 1)
    ]
    ingest = endpoints[0]
    publish = f"tcp://127.0.0.1:{free_port()}"
    metrics = f"127.0.0.1:{free_port()}"
    config_path = tmp_path / "streamd.toml"
    config_path.write_text(daemon_config(endpoints, publish, metrics, workers, extra_toml, ingest_toml, workers_toml))
    log_path = tmp_path / "streamd.log"
    proc = start_daemon(config_path, log_path)
    daemon = Daemon(proc, ingest, publish, metrics, config_path, log_path, endpoints)
    try:
        daemon.wait_for(lambda: READY_LINE in daemon.log(), 30, "the ready log line")
        yield daemon
    finally:
        stop_process(proc)
        daemon.ctx.destroy(0)


def feed(endpoint: str, payloads: list[bytes], frames_before: list[bytes] | None = None) -> None:
    """Send each payload on a plain PUSH socket (optionally after envelope frames)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 10_000)
    sock.connect(endpoint)
    try:
        for payload in payloads:
            sock.send_multipart([*(frames_before or []), payload])
    finally:
        sock.close()
        ctx.term()


def make_ticks(
    n: int, keys: int = 20, seed: int = 0, start_ns: int = 1_700_000_000_000_000_000
) -> list[dict[str, Any]]:
    """Random-walk ticks with strictly increasing times per key (so (k, t) names a record)."""
    rng = np.random.default_rng(seed)
    key_ids = rng.integers(0, keys, n)
    gaps = rng.integers(1, 50_000_000, n)
    t = start_ns + np.cumsum(gaps)
    price = 100 + np.cumsum(rng.normal(0, 0.05, n))
    qty = rng.integers(0, 5, n).astype(float)
    return [
        {"k": f"K{k}", "t": int(ti), "p": float(pi), "q": float(qi)}
        for k, ti, pi, qi in zip(key_ids.tolist(), t.tolist(), price.tolist(), qty.tolist(), strict=True)
    ]


class Subscriber:
    """A SUB socket on the daemon's signal endpoint that collects decoded records."""

    def __init__(
        self, daemon: Daemon, topic: bytes = b"", setup: Callable[[zmq.Socket[Any]], None] | None = None
    ) -> None:
        """``setup`` configures the socket before it connects (e.g. CURVE keys)."""
        self.daemon = daemon
        self.sock = daemon.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        if setup is not None:
            setup(self.sock)
        self.sock.connect(daemon.publish)
        self.records: list[dict[str, Any]] = []
        self.topics: list[bytes] = []

    def sync(self, send: Callable[[bytes], None] | None = None, timeout: float = 20.0) -> None:
        """Feed probe ticks until one comes back, so no later record is lost to the slow joiner."""
        deadline = time.monotonic() + timeout
        send = send or (lambda payload: feed(self.daemon.ingest, [payload]))
        while time.monotonic() < deadline:
            send(msgpack.packb({"k": "__probe__", "t": time.time_ns(), "p": 1.0}))
            if self.collect(lambda: any(r.get("k") == "__probe__" for r in self.records), timeout=0.3, quiet=True):
                self.records.clear()
                self.topics.clear()
                self.drain(0.3)
                self.records.clear()
                self.topics.clear()
                return
        msg = "no probe record came back from the daemon"
        raise AssertionError(msg)

    def drain(self, quiet_for: float) -> None:
        self.collect(lambda: False, timeout=quiet_for, quiet=True)

    def collect(self, done: Callable[[], bool], timeout: float = 20.0, quiet: bool = False) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if quiet:
                    return False
                msg = f"timed out collecting records (have {len(self.records)})"
                raise AssertionError(msg)
            if self.sock.poll(int(min(remaining, 0.1) * 1000)):
                while True:
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.topics.append(frames[0])
                    self.records.append(msgpack.unpackb(frames[-1], strict_map_key=False))
        return True

    def close(self) -> None:
        self.sock.close(0)


def steady_feed(endpoint: str, stop: threading.Event, seed: int, keys: list[str]) -> None:
    """Columnar batches of in-order ticks (~20k ticks/s) until ``stop``: input keeps arriving during a kill."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(endpoint)
    rng = np.random.default_rng(seed)
    t = 1_700_000_000_000_000_000
    try:
        while not stop.is_set():
            n = 100
            t_col = t + np.arange(n, dtype=np.int64)
            t += n
            chosen = rng.choice(keys, n).tolist()
            sock.send(encode_columnar_bin(chosen, t_col, 100 + rng.normal(0, 1, n), np.ones(n)))
            time.sleep(0.005)
    finally:
        sock.close()
        ctx.term()
