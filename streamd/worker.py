"""Analytics worker process: applies tick batches to rolling windows and publishes signals.

One worker per core. It binds a PULL socket that only the ingest process feeds, drains it
without blocking after each wake-up, merges what it drained into one engine call (so a
backlog is cleared in large, cheap batches), and publishes to the supervisor's forwarder,
which fans every worker's signals out on the one public endpoint.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import zmq

from streamd.config import Config, SignalSpec
from streamd.logs import setup_logging
from streamd.metrics import WorkerMetrics
from streamd.records import encode_batch_record, encode_record_payloads, record_head, topic_for
from streamd.runtime import RuntimePaths, name_process
from streamd.transport import EndOfInput, Reconfigure, WorkerBatch, decode
from streamd.windows import Engine, SignalResult

_DRAIN_LIMIT = 256  # messages per wake-up before the worker processes what it has
_SNDMORE = int(zmq.SNDMORE)  # plain ints: send_multipart and flag enums cost 3x two plain sends


class Throttle:
    """``emit_interval``: at most one row per key per interval (wall clock), newest wins."""

    def __init__(self, interval_ns: int, stats: Sequence[str]) -> None:
        self.interval_ns = interval_ns
        self.stats = tuple(stats)
        self.last_emit = np.zeros(0, np.int64)
        self.pending = np.zeros(0, bool)
        self.pending_t = np.zeros(0, np.int64)
        self.pending_values = np.zeros((len(self.stats), 0))

    def _grow(self, n_slots: int) -> None:
        extra = n_slots - len(self.last_emit)
        if extra <= 0:
            return
        extra = max(extra, len(self.last_emit))
        self.last_emit = np.concatenate([self.last_emit, np.full(extra, np.iinfo(np.int64).min // 2)])
        self.pending = np.concatenate([self.pending, np.zeros(extra, bool)])
        self.pending_t = np.concatenate([self.pending_t, np.zeros(extra, np.int64)])
        self.pending_values = np.concatenate([self.pending_values, np.zeros((len(self.stats), extra))], axis=1)

    def admit(self, result: SignalResult, now_ns: int) -> SignalResult:
        """Rows that may go out now; the others wait in ``pending`` (newest wins)."""
        self._grow(int(result.slots.max()) + 1 if len(result.slots) else 0)
        due = self.last_emit[result.slots] + self.interval_ns <= now_ns
        held = result.slots[~due]
        self.pending[held] = True
        self.pending_t[held] = result.t[~due]
        for row, name in enumerate(self.stats):
            self.pending_values[row, held] = result.stats[name][~due]
        sent = result.slots[due]
        self.pending[sent] = False
        self.last_emit[sent] = now_ns
        return SignalResult(sent, result.t[due], {name: col[due] for name, col in result.stats.items()})

    def due(self, now_ns: int, *, everything: bool = False) -> SignalResult | None:
        """Held rows whose interval has elapsed (all held rows when ``everything``, at shutdown)."""
        if not len(self.pending):
            return None
        ready = self.pending if everything else self.pending & (self.last_emit + self.interval_ns <= now_ns)
        slots = np.flatnonzero(ready)
        if not len(slots):
            return None
        self.pending[slots] = False
        self.last_emit[slots] = now_ns
        stats = {name: self.pending_values[row, slots] for row, name in enumerate(self.stats)}
        return SignalResult(slots, self.pending_t[slots], stats)


class SignalPublisher:
    """Publishes one signal's rows in record or batch mode, honouring ``emit_interval``."""

    def __init__(self, spec: SignalSpec, sock: zmq.Socket[Any], metrics: WorkerMetrics) -> None:
        self.spec = spec
        self._sock = sock
        self._topics: list[bytes] = []
        self._heads: list[bytes] = []
        self._published = metrics.signals_published.labels(spec.name)
        self._messages = metrics.publish_messages.labels(spec.name)
        self._throttle = Throttle(spec.emit_interval_ns, spec.stats) if spec.emit_interval_ns else None

    def add_keys(self, keys: Sequence[str | int]) -> None:
        """Topics and record heads are built once per key lifetime."""
        self._topics.extend(topic_for(self.spec.name, key) for key in keys)
        self._heads.extend(record_head(self.spec.name, key, len(self.spec.stats)) for key in keys)

    def publish(self, result: SignalResult, keys: np.ndarray) -> None:
        if self._throttle is not None:
            result = self._throttle.admit(result, time.time_ns())
        self._send(result, keys)

    def flush_due(self, keys: np.ndarray, *, everything: bool = False) -> None:
        if self._throttle is None:
            return
        result = self._throttle.due(time.time_ns(), everything=everything)
        if result is not None:
            self._send(result, keys)

    def _send(self, result: SignalResult, keys: np.ndarray) -> None:
        rows = len(result.slots)
        if not rows:
            return
        stats = {name: result.stats[name] for name in self.spec.stats}
        pub_ns = time.time_ns()
        if self.spec.publish == "batch":
            row_keys = keys[result.slots].tolist()
            self._sock.send_multipart(encode_batch_record(self.spec.name, row_keys, result.t, stats, pub_ns))
            self._messages.inc()
        else:
            slots = result.slots.tolist()
            payloads = encode_record_payloads([self._heads[s] for s in slots], result.t, stats, pub_ns)
            send = self._sock.send
            for slot, payload in zip(slots, payloads, strict=True):
                send(self._topics[slot], _SNDMORE)
                send(payload)
            self._messages.inc(rows)
        self._published.inc(rows)


class Worker:
    """startup() -> main_loop() -> shutdown() for one analytics worker."""

    def __init__(self, index: int, config: Config, paths: RuntimePaths, done: Any, conn: Connection) -> None:
        self.index = index
        self.config = config
        self.paths = paths
        self.done = done
        self.conn = conn
        self.log = setup_logging(config.log, f"worker{index}")
        self.metrics = WorkerMetrics(index)
        self.engine = Engine(config.signals)
        self.keys = np.empty(0, dtype=object)
        self.n_keys = 0
        self.running = True

    def startup(self) -> None:
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.RCVHWM, self.config.workers.queue_batches)
        self.pull.bind(self.paths.worker_endpoint(self.index))
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, self.config.publish.sndhwm)
        self.pub.setsockopt(zmq.LINGER, 2000)
        self.pub.connect(self.paths.forwarder_endpoint)
        self.publishers = [SignalPublisher(spec, self.pub, self.metrics) for spec in self.config.signals]
        self.log.info("worker started", extra={"worker": self.index, "signals": len(self.config.signals)})
        self.conn.send(("ready", self.index))

    def main_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.conn.fileno(), zmq.POLLIN)
        while self.running:
            poller.poll(self._poll_timeout_ms())
            self._drain()
            for publisher in self.publishers:
                publisher.flush_due(self.keys)
            if self.conn.poll():
                self._on_control(self.conn.recv())

    def _poll_timeout_ms(self) -> int:
        intervals = [p.spec.emit_interval_ns for p in self.publishers if p.spec.emit_interval_ns]
        return max(1, min(intervals) // 1_000_000) if intervals else 100

    def _on_control(self, message: tuple[Any, ...]) -> None:
        if message[0] == "stop":
            self.running = False

    def _drain(self) -> None:
        """Receive everything queued (bounded), processing data between control messages."""
        batches: list[WorkerBatch] = []
        for _ in range(_DRAIN_LIMIT):
            try:
                frames = self.pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            message = decode([frame.buffer for frame in frames])
            if isinstance(message, WorkerBatch):
                batches.append(message)
                continue
            self._process(batches)
            batches = []
            if isinstance(message, Reconfigure):
                self._reconfigure(message.signals)
            elif isinstance(message, EndOfInput):
                self.running = False
                break
        self._process(batches)

    def _register_keys(self, batches: list[WorkerBatch]) -> None:
        new = [pair for batch in batches for pair in batch.new_keys]
        if not new:
            return
        top = max(slot for slot, _ in new) + 1
        if top > len(self.keys):
            grown = np.empty(max(top, 2 * len(self.keys)), dtype=object)
            grown[: len(self.keys)] = self.keys
            self.keys = grown
        for slot, key in new:
            self.keys[slot] = key
        first_new = self.n_keys
        self.n_keys = max(self.n_keys, top)
        for publisher in self.publishers:
            publisher.add_keys(self.keys[first_new : self.n_keys].tolist())

    def _process(self, batches: list[WorkerBatch]) -> None:
        if not batches:
            return
        started = time.perf_counter()
        self._register_keys(batches)
        slots, t, p, q = (
            np.concatenate(cols) if len(batches) > 1 else cols[0]
            for cols in zip(*((b.slots, b.t, b.p, b.q) for b in batches), strict=True)
        )
        results, late = self.engine.process(slots, t, p, q)
        for publisher, result in zip(self.publishers, results, strict=True):
            publisher.publish(result, self.keys)
        now = time.time_ns()
        last = batches[-1]
        self.done[self.index] = last.seq_start + len(last.t)
        self._record(batches, len(t), late, now, int(t.max()) if len(t) else now, started)

    def _record(self, batches: list[WorkerBatch], ticks: int, late: int, now: int, newest: int, started: float) -> None:
        metrics = self.metrics
        metrics.ticks_processed.inc(ticks - late)
        if late:
            metrics.ticks_dropped.labels("late").inc(late)
        metrics.latency.observe((now - min(b.recv_ns for b in batches)) / 1e9)
        metrics.event_lag.observe(max(0, now - newest) / 1e9)
        metrics.batches.inc(len(batches))
        metrics.keys.set(self.engine.n_keys)
        metrics.state_bytes.set(self.engine.memory_bytes())
        metrics.busy.inc(time.perf_counter() - started)

    def _reconfigure(self, signals: tuple[SignalSpec, ...]) -> None:
        for publisher in self.publishers:
            publisher.flush_due(self.keys, everything=True)
        self.engine.reconfigure(signals)
        self.config = dataclasses.replace(self.config, signals=signals)
        self.publishers = [SignalPublisher(spec, self.pub, self.metrics) for spec in signals]
        for publisher in self.publishers:
            publisher.add_keys(self.keys[: self.n_keys].tolist())
        self.log.info("signals reconfigured", extra={"worker": self.index, "signals": len(signals)})

    def shutdown(self) -> None:
        for publisher in self.publishers:
            publisher.flush_due(self.keys, everything=True)
        self.pull.close(0)
        self.pub.close()
        self.ctx.term()
        self.log.info("worker stopped", extra={"worker": self.index})


def worker_main(index: int, config: Config, paths: RuntimePaths, done: Any, conn: Connection) -> None:
    """Entry point of a worker process (started with the ``spawn`` context)."""
    name_process(f"streamd-worker{index}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = Worker(index, config, paths, done, conn)
    try:
        worker.startup()
    except zmq.ZMQError as exc:
        conn.send(("error", f"worker {index}: cannot bind {paths.worker_endpoint(index)}: {exc}"))
        sys.exit(1)
    worker.main_loop()
    worker.shutdown()
