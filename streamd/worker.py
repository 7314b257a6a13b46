"""Analytics worker process: applies tick batches to rolling windows and publishes signals.

One worker per core. It binds a PULL socket that every ingest process feeds, drains it
without blocking after each wake-up, merges what it drained into one engine call (so a
backlog is cleared in large, cheap batches), publishes to the supervisor's forwarder, which
fans every worker's signals out on the one public endpoint, and then acks each ingest it
heard from, which is how an ingest knows the worker is free for its next batch.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import zmq

from streamd.config import Config, SignalSpec
from streamd.control import Failed, Ready, Reload, Stop
from streamd.fencing import FENCE_FIELDS, PartitionView
from streamd.ledger import TickLedger
from streamd.logs import apply_log_config, setup_logging
from streamd.metrics import WorkerMetrics
from streamd.records import encode_batch_record, encode_record_payloads, record_head, topic_for
from streamd.runtime import RuntimePaths, die_with_parent, name_process
from streamd.transport import EndOfInput, PartitionDropped, PartitionOwned, WorkerBatch, decode, encode_ack
from streamd.windows import KERNEL, Engine, SignalResult

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

    def forget(self, slots: np.ndarray) -> None:
        """Rows held for these keys are not sent (their partition left this instance)."""
        self.pending[slots[slots < len(self.pending)]] = False


class SignalPublisher:
    """Publishes one signal's rows in record or batch mode, honouring ``emit_interval``."""

    def __init__(
        self, spec: SignalSpec, sock: zmq.Socket[Any], metrics: WorkerMetrics, extra: tuple[str, ...] = ()
    ) -> None:
        self.spec = spec
        self.fields = (*spec.stats, *extra)  # extra: per-row fields beside the stats (cluster: part, fence)
        self._sock = sock
        self._topics: list[bytes] = []
        self._heads: list[bytes] = []
        self._published = metrics.signals_published.labels(spec.name)
        self._messages = metrics.publish_messages.labels(spec.name)
        self._throttle = Throttle(spec.emit_interval_ns, self.fields) if spec.emit_interval_ns else None

    def add_keys(self, keys: Sequence[str | int]) -> None:
        """Topics and record heads are built once per key lifetime."""
        self._topics.extend(topic_for(self.spec.name, key) for key in keys)
        self._heads.extend(record_head(self.spec.name, key, len(self.fields)) for key in keys)

    def publish(self, result: SignalResult, keys: np.ndarray) -> None:
        if self._throttle is not None:
            result = self._throttle.admit(result, time.time_ns())
        self._send(result, keys)

    def forget(self, slots: np.ndarray) -> None:
        if self._throttle is not None:
            self._throttle.forget(slots)

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
        stats = {name: result.stats[name] for name in self.fields}
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


class KeyTable:
    """The worker's keys: a dense local index per key, and each ingest's slot -> local index.

    Each ingest numbers the keys it sends here on its own, and a replaced ingest numbers them
    afresh, so the same key may arrive under different slots from different ingests (or
    incarnations of one); all of them lead to the one local index that the engine and the
    publishers use. Tables of incarnations two generations old are dropped: by then nothing of
    theirs can still be queued.
    """

    def __init__(self) -> None:
        self.keys = np.empty(0, dtype=object)
        self.count = 0
        self._index: dict[str | int, int] = {}
        self._tables: dict[tuple[int, int], np.ndarray] = {}

    def learn(self, ingest: int, generation: int, announced: list[tuple[int, str | int]]) -> list[str | int]:
        """Record an ingest's new ``(slot, key)`` pairs; return the keys this worker had never seen."""
        table = self._table(ingest, generation)
        if not announced:
            return []
        fresh: list[str | int] = []
        top = max(slot for slot, _ in announced) + 1
        if top > len(table):
            grown = np.zeros(max(top, 2 * len(table)), np.int64)
            grown[: len(table)] = table
            table = self._tables[ingest, generation] = grown
        for slot, key in announced:
            local = self._index.get(key)
            if local is None:
                local = self._index[key] = self.count + len(fresh)
                fresh.append(key)
            table[slot] = local
        if fresh:
            self._append(fresh)
        return fresh

    def _table(self, ingest: int, generation: int) -> np.ndarray:
        table = self._tables.get((ingest, generation))
        if table is None:
            table = self._tables[ingest, generation] = np.zeros(0, np.int64)
            for old in [k for k in self._tables if k[0] == ingest and k[1] < generation - 1]:
                del self._tables[old]
        return table

    def _append(self, fresh: list[str | int]) -> None:
        needed = self.count + len(fresh)
        if needed > len(self.keys):
            grown = np.empty(max(needed, 2 * len(self.keys)), dtype=object)
            grown[: self.count] = self.keys[: self.count]
            self.keys = grown
        self.keys[self.count : needed] = fresh
        self.count = needed

    def local(self, ingest: int, generation: int, slots: np.ndarray) -> np.ndarray:
        """Local key indices of an ingest's slots."""
        local: np.ndarray = self._tables[ingest, generation][slots]
        return local


class Worker:
    """startup() -> main_loop() -> shutdown() for one analytics worker."""

    def __init__(
        self, index: int, generation: int, config: Config, paths: RuntimePaths, ledger: TickLedger, conn: Connection
    ) -> None:
        self.index = index
        self.generation = generation
        self.config = config
        self.paths = paths
        self.ledger = ledger
        self.conn = conn
        self.ingests = len(config.ingest.endpoints) + (config.cluster is not None)  # the cluster reader feeds too
        self.view = PartitionView(config.cluster.partitions) if config.cluster is not None else None
        self.log = setup_logging(config.log, f"worker{index}")
        self.metrics = WorkerMetrics(index)
        self.engine = Engine(config.signals)
        self.table = KeyTable()
        self.ended: set[int] = set()
        self.running = True
        self.orphaned = False  # the supervisor died: nobody reads our signals any more

    def startup(self) -> None:
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.RCVHWM, self.config.workers.queue_batches)
        self.pull.bind(self.paths.worker_endpoint(self.index))
        self.acks = []
        for ingest in range(self.ingests):
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.paths.ack_endpoint(ingest))
            self.acks.append(sock)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, self.config.publish.sndhwm)
        self.pub.setsockopt(zmq.LINGER, 2000)
        self.pub.connect(self.paths.forwarder_endpoint)
        self.publishers = self._publishers(self.config.signals)
        engine = "c-kernel" if KERNEL is not None else "numpy (the C kernel is not built: see docs/deploy.md)"
        self.log.info(
            "worker started", extra={"worker": self.index, "signals": len(self.config.signals), "engine": engine}
        )
        self.conn.send(Ready())

    def main_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.conn.fileno(), zmq.POLLIN)
        while self.running:
            poller.poll(self._poll_timeout_ms())
            self._drain()
            for publisher in self.publishers:
                publisher.flush_due(self.table.keys)
            self._on_control()

    def _poll_timeout_ms(self) -> int:
        intervals = [p.spec.emit_interval_ns for p in self.publishers if p.spec.emit_interval_ns]
        return max(1, min(intervals) // 1_000_000) if intervals else 100

    def _on_control(self) -> None:
        try:
            while self.conn.poll():
                message = self.conn.recv()
                if isinstance(message, Stop):
                    self.running = False
                elif isinstance(message, Reload):
                    self._reload(message.config)
        except (EOFError, OSError):
            self.log.error("supervisor is gone; worker exiting", extra={"worker": self.index})
            self.running = False
            self.orphaned = True

    def _drain(self) -> None:
        """Receive everything queued (bounded) and apply it as one engine call."""
        batches: list[WorkerBatch] = []
        for _ in range(_DRAIN_LIMIT):
            try:
                frames = self.pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            message = decode([frame.buffer for frame in frames])
            if isinstance(message, PartitionOwned | PartitionDropped):
                self._process(batches)  # what came before it was read under the previous ownership
                batches = []
                self._on_ownership(message)
            elif isinstance(message, EndOfInput):
                self.ended.add(message.ingest)
                self.running = len(self.ended) < self.ingests
            elif message.generation == self.generation:
                batches.append(message)
            else:
                self.metrics.stale_batches.inc()
        self._process(batches)

    def _process(self, batches: list[WorkerBatch]) -> None:
        if not batches:
            return
        started = time.perf_counter()
        fresh = [
            key for batch in batches for key in self.table.learn(batch.ingest, batch.ingest_generation, batch.new_keys)
        ]
        if self.view is not None:
            self.view.learn(fresh)
        for publisher in self.publishers:
            publisher.add_keys(fresh)
        slots, t, p, q = (
            np.concatenate(cols) if len(batches) > 1 else cols[0]
            for cols in zip(
                *((self.table.local(b.ingest, b.ingest_generation, b.slots), b.t, b.p, b.q) for b in batches),
                strict=True,
            )
        )
        results, late = self.engine.process(slots, t, p, q)
        for publisher, result in zip(self.publishers, results, strict=True):
            publisher.publish(result if self.view is None else self.view.visible(result), self.table.keys)
        now = time.time_ns()
        self._record(batches, now, int(t.max()) if len(t) else now, started)
        self._settle(batches, len(t), late)

    def _settle(self, batches: list[WorkerBatch], ticks: int, late: int) -> None:
        """Count the ticks, mark them applied in the ledger, then ack each ingest heard from.

        The two counts are written back to back with no system call between them, so a
        kill -9 can hardly fall between "processed" and "applied" (which would count a batch
        twice or not at all); the acks, which wake an ingest that may take this CPU, go last.
        """
        self.metrics.ticks_processed.inc(ticks - late)
        if late:
            self.metrics.ticks_dropped.labels("late").inc(late)
        newest = {batch.ingest: batch.seq_start + len(batch.t) for batch in batches}
        for ingest, upto in newest.items():
            self.ledger.mark_applied(ingest, self.index, upto)
        ack = encode_ack(self.index, self.generation)
        for ingest in newest:
            with contextlib.suppress(zmq.Again):
                self.acks[ingest].send(ack, zmq.NOBLOCK)

    def _on_ownership(self, message: PartitionOwned | PartitionDropped) -> None:
        """Apply a change of ownership: a new term or a loss forgets the partition's windows."""
        assert self.view is not None
        if isinstance(message, PartitionOwned):
            stale = self.view.own(message.partition, message.token, live=message.live)
        else:
            stale = self.view.drop(message.partition)
        if len(stale):
            self.engine.evict(stale)
            for publisher in self.publishers:
                publisher.forget(stale)

    def _record(self, batches: list[WorkerBatch], now: int, newest: int, started: float) -> None:
        metrics = self.metrics
        metrics.latency.observe((now - min(b.recv_ns for b in batches)) / 1e9)
        metrics.event_lag.observe(max(0, now - newest) / 1e9)
        metrics.batches.inc(len(batches))
        metrics.keys.set(self.engine.n_keys)
        metrics.state_bytes.set(self.engine.memory_bytes())
        metrics.busy.inc(time.perf_counter() - started)

    def _reload(self, config: Config) -> None:
        """Apply reloaded signals and logging at a batch boundary (what was queued is applied first)."""
        self._drain()
        apply_log_config(config.log)
        for publisher in self.publishers:
            publisher.flush_due(self.table.keys, everything=True)
        self.engine.reconfigure(config.signals)
        self.config = config
        self.publishers = self._publishers(config.signals)
        for publisher in self.publishers:
            publisher.add_keys(self.table.keys[: self.table.count].tolist())
        self.log.info("signals reconfigured", extra={"worker": self.index, "signals": len(config.signals)})

    def _publishers(self, signals: tuple[SignalSpec, ...]) -> list[SignalPublisher]:
        extra = FENCE_FIELDS if self.view is not None else ()
        return [SignalPublisher(spec, self.pub, self.metrics, extra) for spec in signals]

    def shutdown(self) -> None:
        for publisher in self.publishers:
            publisher.flush_due(self.table.keys, everything=True)
        self.pull.close(0)
        for sock in self.acks:
            sock.close(0)
        self.pub.close(0 if self.orphaned else None)
        self.ctx.term()
        self.log.info("worker stopped", extra={"worker": self.index})


def worker_main(
    index: int, generation: int, config: Config, paths: RuntimePaths, ledger: TickLedger, conn: Connection
) -> None:
    """Entry point of a worker process (started with the ``spawn`` context)."""
    name_process(f"streamd-worker{index}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    worker = Worker(index, generation, config, paths, ledger, conn)
    try:
        worker.startup()
    except zmq.ZMQError as exc:
        conn.send(Failed(f"worker {index}: cannot bind {paths.worker_endpoint(index)}: {exc}"))
        sys.exit(1)
    worker.main_loop()
    worker.shutdown()
