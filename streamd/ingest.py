"""Ingest process: where a tick enters streamd.

An asyncio loop (uvloop) watches the input sockets' file descriptors and, after each
wake-up, drains them with non-blocking receives (awaiting one message at a time through
zmq.asyncio is ten times slower). Payloads are decoded a drain at a time
(:func:`streamd.protocol.decode_payloads`), sharded by key (:func:`streamd.sharding.shard_for`,
cached per key) and buffered per worker until ``latency.max_batch_size`` ticks or
``latency.max_batch_delay`` after the oldest buffered tick, whichever comes first.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import uvloop
import zmq

from streamd.config import Config
from streamd.logs import RateLimiter, setup_logging
from streamd.metrics import IngestMetrics
from streamd.protocol import DecodedTicks, decode_payloads
from streamd.router import KeyRouter, Outbox
from streamd.runtime import RuntimePaths, StartupError, name_process
from streamd.transport import WorkerBatch, encode_batch, encode_end_of_input, encode_reconfigure

_DRAIN_LIMIT = 4096  # messages per wake-up before yielding to timers and control
_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: converting the flag enum on every receive shows in profiles
_DRAIN_BYTES = 4 << 20  # payload bytes per wake-up: bounds decode chunks when messages are big batches


def receive_payloads(sock: zmq.Socket[Any], payloads: list[bytes], limit: int, max_bytes: int) -> tuple[bool, int]:
    """Append up to ``limit`` payloads (or ``max_bytes``) without blocking; True when the socket is empty.

    Frames are read one at a time with ``copy=False`` and ``Frame.more``: ``recv_multipart``
    and the ``rcvmore`` socket option cost several times a plain receive. Only the last frame
    of a message is the payload; earlier frames are an envelope.
    """
    recv = sock.recv
    size = 0
    for _ in range(limit):
        try:
            frame = recv(_NOBLOCK, copy=False)
        except zmq.Again:
            return True, size
        while frame.more:
            frame = recv(_NOBLOCK, copy=False)
        payload = frame.bytes
        payloads.append(payload)
        size += len(payload)
        if size >= max_bytes:
            break
    return False, size


class Ingest:
    """startup() -> serve() -> shutdown() for the ingest process."""

    def __init__(self, config: Config, paths: RuntimePaths, sent: Any, done: Any, conn: Connection) -> None:
        self.config = config
        self.paths = paths
        self.sent = sent
        self.done = done
        self.conn = conn
        self.workers = config.workers.resolved_count()
        self.log = setup_logging(config.log, "ingest")
        self.limited = RateLimiter(self.log, config.log.rate_limit_per_s)
        self.metrics = IngestMetrics()
        self.router = KeyRouter(self.workers)
        self.outboxes = [Outbox() for _ in range(self.workers)]
        self.oldest_recv_ns = 0
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.flush_handle: asyncio.TimerHandle | None = None
        self.stopped = asyncio.Event()

    # start-up -------------------------------------------------------------------------
    def startup(self) -> None:
        self.ctx = zmq.Context()
        self.inputs = [self._open_input(endpoint) for endpoint in self.config.ingest.endpoints]
        self.outputs = [self._open_output(i) for i in range(self.workers)]
        self.loop = asyncio.get_running_loop()
        for sock in self.inputs:
            self.loop.add_reader(sock.fileno(), self._drain)
        self.loop.add_reader(self.conn.fileno(), self._on_control)
        self.loop.call_soon(self._drain)
        self.log.info(
            "ingest started",
            extra={"mode": self.config.ingest.mode, "endpoints": ",".join(self.config.ingest.endpoints)},
        )
        self.conn.send(("ready", "ingest"))

    def _open_input(self, endpoint: str) -> zmq.Socket[Any]:
        ingest = self.config.ingest
        sock = self.ctx.socket(zmq.PULL if ingest.mode == "pull" else zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, ingest.rcvhwm)
        try:
            if ingest.mode == "pull":
                sock.bind(endpoint)
            else:
                for prefix in ingest.subscribe:
                    sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
                sock.connect(endpoint)
        except zmq.ZMQError as exc:
            verb = "bind" if ingest.mode == "pull" else "connect to"
            msg = f"ingest.endpoints: cannot {verb} {endpoint}: {zmq.strerror(exc.errno or 0)}"
            raise StartupError(msg) from None
        return sock

    def _open_output(self, worker: int) -> zmq.Socket[Any]:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.config.workers.queue_batches)
        sock.connect(self.paths.worker_endpoint(worker))
        return sock

    # main loop ------------------------------------------------------------------------
    def _drain(self) -> None:
        """Receive what the input sockets hold (bounded per wake-up); decoding waits for the flush.

        Decoding, routing and sending have a fixed cost per call, so they run once per batch,
        not once per wake-up: at moderate rates a wake-up often brings a single message.
        """
        exhausted = True
        for sock in self.inputs:
            drained, size = receive_payloads(sock, self.pending, _DRAIN_LIMIT, _DRAIN_BYTES - self.pending_bytes)
            self.pending_bytes += size
            exhausted = exhausted and drained
        if not self.pending:
            return
        if not self.oldest_recv_ns:
            self.oldest_recv_ns = time.time_ns()
        if not exhausted:
            self.loop.call_soon(self._drain)
        self._maybe_flush()

    def _account(self, messages: int, size: int, decoded: DecodedTicks) -> None:
        metrics = self.metrics
        metrics.messages_received.inc(messages)
        metrics.bytes_received.inc(size)
        metrics.ticks_received.inc(decoded.received)
        for reason, count in decoded.tick_drops.items():
            metrics.ticks_dropped.labels(reason).inc(count)
        for reason, count in decoded.message_drops.items():
            metrics.messages_dropped.labels(reason).inc(count)
        for reason, example in decoded.examples.items():
            self.limited.warning(reason, "input dropped", reason=reason, example=example)
        if decoded.keys:
            self._route(decoded)

    def _route(self, decoded: DecodedTicks) -> None:
        codes = self.router.route(decoded.keys, self.outboxes)
        workers = codes % self.workers
        slots = codes // self.workers
        if self.workers == 1:
            self._buffer(0, slots, decoded.t, decoded.p, decoded.q)
            return
        order = np.argsort(workers, kind="stable")
        bounds = np.searchsorted(workers[order], np.arange(self.workers + 1))
        for worker in range(self.workers):
            part = order[bounds[worker] : bounds[worker + 1]]
            if len(part):
                self._buffer(worker, slots[part], decoded.t[part], decoded.p[part], decoded.q[part])

    def _buffer(self, worker: int, slots: np.ndarray, t: np.ndarray, p: np.ndarray, q: np.ndarray) -> None:
        outbox = self.outboxes[worker]
        outbox.parts.append((slots, t, p, q))
        outbox.ticks += len(t)

    def _maybe_flush(self) -> None:
        if not self.oldest_recv_ns:
            return
        age = time.time_ns() - self.oldest_recv_ns
        full = len(self.pending) >= self.config.latency.max_batch_size or self.pending_bytes >= _DRAIN_BYTES
        if full or age >= self.config.latency.max_batch_delay_ns:
            self.flush()
        elif self.flush_handle is None:
            delay = (self.config.latency.max_batch_delay_ns - age) / 1e9
            self.flush_handle = self.loop.call_later(delay, self._on_flush_timer)

    def _on_flush_timer(self) -> None:
        self.flush_handle = None
        self._drain()
        if self.oldest_recv_ns:
            self.flush()

    def flush(self) -> None:
        """Decode what was received since the last flush and hand every worker its ticks."""
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        recv_ns, self.oldest_recv_ns = self.oldest_recv_ns, 0
        payloads, size = self.pending, self.pending_bytes
        self.pending, self.pending_bytes = [], 0
        if payloads:
            self._account(len(payloads), size, decode_payloads(payloads))
        for worker, outbox in enumerate(self.outboxes):
            if outbox.ticks:
                self._send(worker, outbox, recv_ns)

    def _send(self, worker: int, outbox: Outbox, recv_ns: int) -> None:
        """Send the outbox in batches of at most ``max_batch_size`` ticks."""
        columns = [np.concatenate(c) if len(outbox.parts) > 1 else c[0] for c in zip(*outbox.parts, strict=True)]
        self.outboxes[worker] = Outbox()
        size = self.config.latency.max_batch_size
        new_keys = outbox.new_keys
        for start in range(0, outbox.ticks, size):
            chunk = [column[start : start + size] for column in columns]
            slots, t, p, q = chunk
            if self._send_batch(worker, WorkerBatch(slots, t, p, q, new_keys, recv_ns, self.sent[worker])):
                new_keys = []

    def _send_batch(self, worker: int, batch: WorkerBatch) -> bool:
        """Queue one batch for a worker; on a full queue drop it (counted) and keep its key announcements."""
        ticks = len(batch.t)
        try:
            self.outputs[worker].send_multipart(encode_batch(batch), zmq.NOBLOCK, copy=ticks < 1024)
        except zmq.Again:
            self.metrics.ticks_dropped.labels("overflow").inc(ticks)
            self.limited.warning("overflow", "worker queue full, batch dropped", worker=worker, ticks=ticks)
            self.outboxes[worker].new_keys.extend(batch.new_keys)
            return False
        self.sent[worker] += ticks
        self.metrics.batch_size.observe(ticks)
        self.metrics.batches_sent.labels(str(worker)).inc()
        return True

    # control --------------------------------------------------------------------------
    def _on_control(self) -> None:
        while self.conn.poll():
            message = self.conn.recv()
            command = message[0]
            if command == "stop":
                self._stop_intake()
            elif command == "worker_lost":
                self._reset_worker(message[1])
            elif command == "reconfigure":
                self._reconfigure(message[1])

    def _reset_worker(self, worker: int) -> None:
        """Account for what died with a worker and start its queue afresh for the replacement.

        Closing the PUSH socket with linger 0 discards batches still queued for the dead
        process, so ``sent - done`` is exactly what was lost, and nothing stale can reach
        the replacement (the supervisor starts it only after this acknowledgement).
        """
        self.outputs[worker].close(0)
        self.outputs[worker] = self._open_output(worker)
        lost = self.sent[worker] - self.done[worker]
        if lost > 0:
            self.metrics.ticks_dropped.labels("worker_lost").inc(lost)
        self.done[worker] = self.sent[worker]
        self.router.forget_worker(worker)
        self.outboxes[worker] = Outbox()
        self.log.warning("worker lost, its queue was reset", extra={"worker": worker, "lost_ticks": lost})
        self.conn.send(("worker_reset", worker))

    def _reconfigure(self, config: Config) -> None:
        self.flush()
        self.config = config
        for sock in self.outputs:
            sock.send_multipart(encode_reconfigure(config.signals))
        self.log.info("signals and emission settings reloaded", extra={"signals": len(config.signals)})

    def _stop_intake(self) -> None:
        for sock in self.inputs:
            self.loop.remove_reader(sock.fileno())
        self._drain_once_more()
        self.oldest_recv_ns = self.oldest_recv_ns or time.time_ns()
        self.flush()
        for sock in self.outputs:
            sock.send_multipart(encode_end_of_input())
        self.stopped.set()

    def _drain_once_more(self) -> None:
        """Whatever arrived before intake stopped is still received, flushed and accounted for."""
        for sock in self.inputs:
            while True:
                drained, size = receive_payloads(sock, self.pending, _DRAIN_LIMIT, _DRAIN_BYTES)
                self.pending_bytes += size
                if drained:
                    break
                self.flush()

    async def serve(self) -> None:
        await self.stopped.wait()

    def shutdown(self) -> None:
        for sock in self.inputs:
            sock.close(0)
        for sock in self.outputs:
            sock.setsockopt(zmq.LINGER, 5000)
            sock.close()
        self.ctx.term()
        self.log.info("ingest stopped")


async def _run(ingest: Ingest) -> None:
    ingest.startup()
    await ingest.serve()


def ingest_main(config: Config, paths: RuntimePaths, sent: Any, done: Any, conn: Connection) -> None:
    """Entry point of the ingest process (started with the ``spawn`` context)."""
    name_process("streamd-ingest")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ingest = Ingest(config, paths, sent, done, conn)
    try:
        uvloop.run(_run(ingest))
    except StartupError as exc:
        conn.send(("error", str(exc)))
        sys.exit(1)
    ingest.shutdown()
