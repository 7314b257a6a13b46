"""``streamd demo``: the daemon on its built-in config, fed by an embedded synthetic feed.

A feed process sends random-walk prices for a few hundred keys to the ingest endpoint;
a printer thread subscribes to the signal endpoint and shows the latest signals of a few
keys every second. Metrics are served as in production.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from typing import Any

import msgpack
import numpy as np
import zmq

from streamd.config import Config
from streamd.records import decode_record
from streamd.supervisor import Supervisor

_SHOWN_KEYS = 6


def feed(endpoint: str, rate: int, keys: int, stop: Any) -> None:
    """Random walks for ``keys`` keys at about ``rate`` ticks/s, as columnar batches every 10 ms."""
    rng = np.random.default_rng(7)
    names = [f"SYM{i:03d}" for i in range(keys)]
    prices = rng.uniform(10, 500, keys)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    per_batch = max(1, rate // 100)
    while not stop.is_set():
        picks = rng.zipf(1.3, per_batch) % keys
        prices[picks] *= np.exp(rng.normal(0, 1e-4, per_batch))
        now = time.time_ns()
        t = now - np.arange(per_batch)[::-1] * (10_000_000 // per_batch)
        payload = {
            "k": [names[i] for i in picks.tolist()],
            "t": t.tolist(),
            "p": np.round(prices[picks], 4).tolist(),
            "q": rng.integers(1, 500, per_batch).tolist(),
        }
        sock.send(msgpack.packb(payload))
        time.sleep(0.01)
    sock.close(0)
    ctx.term()


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def printer(endpoint: str, stop: threading.Event) -> None:
    """Show the latest signals of a few keys once a second."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.RCVTIMEO, 200)
    sock.connect(endpoint)
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    received = 0
    last_print = time.monotonic()
    while not stop.is_set():
        try:
            record = decode_record(sock.recv_multipart())
            latest[record["signal"], str(record["k"])] = record
            received += 1
        except zmq.Again:
            pass
        if time.monotonic() - last_print >= 1.0:
            _print_table(latest, received, time.monotonic() - last_print)
            received, last_print = 0, time.monotonic()
    sock.close(0)
    ctx.term()


def _print_table(latest: dict[tuple[str, str], dict[str, Any]], received: int, elapsed: float) -> None:
    keys = sorted({key for _, key in latest})[:_SHOWN_KEYS]
    lines = [f"--- {time.strftime('%H:%M:%S')}  {received / elapsed:,.0f} signal records/s ---"]
    for key in keys:
        cells = [f"{key:<7}"]
        for (name, k), record in sorted(latest.items()):
            if k != key:
                continue
            stats = {n: v for n, v in record.items() if n not in ("signal", "k", "t", "pub_ns")}
            cells.append(f"{name}: " + " ".join(f"{n}={_fmt(v)}" for n, v in stats.items()))
        lines.append("  ".join(cells))
    print("\n".join(lines), flush=True)


def _start_without_sigint(process: multiprocessing.process.BaseProcess) -> None:
    """Start ``process`` with SIGINT ignored, which it inherits through exec.

    Ctrl-C reaches every process in the terminal's foreground group; the feed is stopped by
    its event, so it must not die of KeyboardInterrupt (with a traceback) on its own first.
    """
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process.start()
    finally:
        signal.signal(signal.SIGINT, previous)


def run_demo(*, duration: float = 0.0, rate: int = 20_000, keys: int = 300) -> int:
    config = Config(source="<demo>")
    mp = multiprocessing.get_context("spawn")
    stop_feed = mp.Event()
    feeder = mp.Process(target=feed, args=(config.ingest.endpoints[0], rate, keys, stop_feed), name="streamd-demo-feed")
    stop_printer = threading.Event()
    show = threading.Thread(target=printer, args=(config.publish.endpoint, stop_printer), daemon=True)
    supervisor = Supervisor(config)
    print(
        f"streamd demo: {keys} keys at ~{rate:,} ticks/s into {config.ingest.endpoints[0]}; "
        f"signals on {config.publish.endpoint}; metrics at http://{config.metrics.listen}/metrics; Ctrl-C stops",
        flush=True,
    )
    _start_without_sigint(feeder)
    show.start()
    if duration > 0:
        threading.Timer(duration, lambda: supervisor.pending_signals.append(signal.SIGINT)).start()
    try:
        return supervisor.run()
    finally:
        stop_feed.set()
        stop_printer.set()
        feeder.join(5)
        if feeder.is_alive():
            feeder.terminate()
            feeder.join(5)
        show.join(5)
