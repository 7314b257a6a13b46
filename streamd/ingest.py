"""Ingest process: where a tick enters streamd. One ingest process per input endpoint.

An asyncio loop (uvloop) watches its input socket's file descriptor and, after each wake-up,
drains it with non-blocking receives (awaiting one message at a time through zmq.asyncio is
ten times slower). What a drain brought is decoded at once (:func:`streamd.protocol.decode_payloads`),
sharded by key (:class:`streamd.router.KeyRouter`) and buffered per worker.

Flow control decides when a worker's buffer leaves: at once if the worker has applied
everything this ingest handed it (it is idle), otherwise when the worker acks its current
work, so a busy worker gets one larger batch instead of a queue of small ones.
``latency.max_batch_size`` and ``latency.max_batch_delay`` bound the wait either way.

New keys cost a worker several times what a tick of a known key does, so they have a lane of
their own: their ticks wait in the outbox's fresh lane and go, at most ``_FRESH_KEYS_PER_BATCH``
keys at a time, when the worker is idle, when it has applied the last new keys it was sent, or
``_FRESH_PATIENCE_NS`` after the lane last let keys go. A flood of new keys then takes the
workers' spare capacity and no more, and keys already flowing keep their latency. Past a
backlog of a quarter of ``ingest.max_queue_bytes`` new keys are refused (``new_key_backlog``)
rather than let the fresh lane grow.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import numpy as np
import uvloop
import zmq

from streamd.clusterfeed import ClusterFeed
from streamd.config import Config, LatencyConfig
from streamd.control import Failed, Ready, Reload, Stop, WorkerLost, WorkerReset
from streamd.curve import secure_input
from streamd.journal import JournalEntry, ReplayJournal
from streamd.ledger import TickLedger
from streamd.logs import RateLimiter, apply_log_config, setup_logging
from streamd.metrics import IngestMetrics
from streamd.protocol import DecodedTicks, decode_payloads
from streamd.router import Columns, KeyRouter, Outbox, WorkerTicks, concatenated, select
from streamd.runtime import RuntimePaths, StartupError, die_with_parent, freeze_startup_objects, name_process
from streamd.transport import WorkerBatch, decode_ack, encode_batch, encode_end_of_input

_DRAIN_LIMIT = 4096  # messages per wake-up before yielding to timers and control
_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: converting the flag enum on every receive shows in profiles
_DRAIN_BYTES = 4 << 20  # payload bytes per wake-up: bounds decode chunks when messages are big batches
_MIN_DRAIN_BYTES = 64 << 10  # the adaptive bound never goes below one large columnar message
_DRAIN_TARGET_S = 0.005  # a drain's work aims at this, so ticks behind it wait about as long at most
_BYTES_PER_TICK = 32  # slot, time, price and quantity: what a held tick costs in outboxes and queues
EPOCH_NS = 1_000_000  # the unit of a key's last-seen time: a millisecond of the monotonic clock
_FRESH_KEYS_PER_BATCH = 1_000  # new keys per batch: a few ms of a worker's time, the most a known key waits
_FRESH_PATIENCE_NS = 100_000_000  # a worker never idle still gets new keys at least this often
_SWEEP_STEP = (65_536, 4_096)  # keys looked at, keys released per sweep step: about 1.5 ms here
_GONE_PER_BATCH = 4_096  # released slots per batch: about 2 ms of a worker's time, like the new keys


_NO_TICKS: Columns = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0))


def sweep_interval_ns(key_ttl_ns: int) -> int:
    """How often a pass looks for silent keys: key_ttl/8, within 10 ms .. 1 s (1 s when keys never expire).

    A key is evicted after between key_ttl and key_ttl plus this of silence, and the few steps a
    pass takes (``_SWEEP_STEP``: each looks at 65,536 keys' last-seen times and releases at most 4,096).
    """
    if not key_ttl_ns:
        return 1_000_000_000
    return min(1_000_000_000, max(10_000_000, key_ttl_ns // 8))


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


def send_now(outbox: Outbox, in_flight: int, latency: LatencyConfig, now_ns: int) -> bool:
    """Flow control: does a worker's buffer leave now, or wait for the worker's ack?

    It leaves at once when the worker has applied everything handed to it (it is idle), and in
    any case at ``max_batch_size`` ticks or when its oldest tick is ``max_batch_delay`` old.
    """
    return (
        in_flight <= 0
        or outbox.ticks >= latency.max_batch_size
        or now_ns >= outbox.oldest_ns + latency.max_batch_delay_ns
    )


def fresh_keys_to_send(
    outbox: Outbox, in_flight: int, latency: LatencyConfig, now_ns: int, fresh_applied: bool = True
) -> int | None:
    """Flow control with two lanes: None while the outbox waits, else how many pending keys go with it.

    An idle worker gets the known lane and up to ``_FRESH_KEYS_PER_BATCH`` pending keys; so does a
    busy one once it has applied the last new keys it was sent (``fresh_applied``), so at most one
    such batch is ever ahead of a known key, or once the fresh lane is due (``_FRESH_PATIENCE_NS``
    after it last let keys go). Otherwise a busy worker gets the known lane alone when
    :func:`send_now` says so.
    """
    if in_flight <= 0 or (outbox.fresh_keys and (fresh_applied or now_ns >= outbox.fresh_due_ns)):
        return _FRESH_KEYS_PER_BATCH
    if (outbox.ticks or outbox.gone) and send_now(outbox, in_flight, latency, now_ns):
        return 0
    return None


def leaves_by(outbox: Outbox, latency: LatencyConfig) -> int:
    """When an outbox leaves even though its worker is still busy: its known lane after
    ``max_batch_delay``, its fresh lane ``_FRESH_PATIENCE_NS`` after it last let keys go."""
    dues = []
    if outbox.ticks or outbox.gone:
        dues.append(outbox.oldest_ns + latency.max_batch_delay_ns)
    if outbox.fresh_keys:
        dues.append(outbox.fresh_due_ns)
    return min(dues)


class Ingest:
    """startup() -> serve() -> shutdown() for the ingest process of one input endpoint."""

    def __init__(self, start: IngestStart, config: Config, paths: RuntimePaths, ledger: TickLedger, conn: Connection):
        index = start.index
        self.index = index
        self.start = start
        self.endpoint = config.ingest.endpoints[index] if index < len(config.ingest.endpoints) else "jetstream"
        self.config = config
        self.paths = paths
        self.ledger = ledger
        self.conn = conn
        self.workers = config.workers.resolved_count()
        self.log = setup_logging(config.log, f"ingest{index}")
        self.limited = RateLimiter(self.log, config.log.rate_limit_per_s)
        self.metrics = IngestMetrics()
        self.router = KeyRouter(self.workers, config.state.max_keys_per_ingest(len(config.ingest.endpoints)))
        self.outboxes = [Outbox() for _ in range(self.workers)]
        self.generations = list(start.worker_generations)
        self.deadline_handle: asyncio.TimerHandle | None = None
        self.sweep_handle: asyncio.TimerHandle | None = None
        self.stopped = asyncio.Event()
        self.orphaned = False  # the supervisor died: exit at once, nothing left to hand over
        self.overloaded = False  # max_queue_bytes reached: input paused (pull) or shed (sub)
        self.drain_bytes = _DRAIN_BYTES  # payload bytes the next drain may take (adapted to its cost)
        self.fresh_gates = [0] * self.workers  # per worker: applied up to here, it may get more new keys
        # With [state], what each worker was handed since its last checkpoint, for its replacement.
        journal_bytes = config.state.journal_bytes // self.workers
        self.journals = [ReplayJournal(journal_bytes) for _ in range(self.workers)] if config.state.dir else None
        self.cluster_feed: ClusterFeed | None = None  # [cluster]: ticks go to JetStream, not to workers

    async def start_cluster_feed(self) -> None:
        """With ``[cluster]``, connect to JetStream before serving; a cluster out of reach is a start-up error."""
        if self.config.cluster is None:
            return
        name = f"{self.config.cluster.name}-ingest{self.index}-g{self.start.generation}"
        self.cluster_feed = ClusterFeed(self.config, name, self.metrics, self.limited)
        try:
            await self.cluster_feed.start()
        except Exception as exc:  # whatever fails here, the ingest cannot publish
            msg = f"cluster.servers: cannot reach JetStream at {', '.join(self.config.cluster.servers)}: {exc!r}"
            raise StartupError(msg) from None

    # start-up -------------------------------------------------------------------------
    def startup(self) -> None:
        self.ctx = zmq.Context()
        self.input = self._open_input()
        self.acks = self.ctx.socket(zmq.PULL)
        self.acks.setsockopt(zmq.LINGER, 0)
        self.acks.bind(self.paths.ack_endpoint(self.index))
        self.outputs = [self._open_output(i) for i in range(self.workers)]
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.input.fileno(), self._drain)
        self.loop.add_reader(self.acks.fileno(), self._on_acks)
        self.loop.add_reader(self.conn.fileno(), self._on_control)
        self.loop.call_soon(self._drain)
        self._sweep()
        self._settle_predecessor()
        self.log.info(
            "ingest started",
            extra={"mode": self.config.ingest.mode, "endpoint": self.endpoint, "generation": self.start.generation},
        )
        self.conn.send(Ready())

    def _settle_predecessor(self) -> None:
        """Close the books of the ingest this one replaces: what it held, and workers it never reset."""
        lost = self.ledger.take_buffered(self.index)
        if lost:
            self.metrics.ticks_dropped.labels("ingest_lost").inc(lost)
        for worker in self.start.write_off:
            written_off = self.ledger.write_off(self.index, worker)
            if written_off:
                self.metrics.ticks_dropped.labels("worker_lost").inc(written_off)
            self.conn.send(WorkerReset(worker, written_off))
        if self.start.generation:
            self.log.warning(
                "replacing a dead ingest: ticks it had received but not handed over are counted as lost",
                extra={"lost_ticks": lost},
            )

    def _open_input(self) -> zmq.Socket[Any]:
        ingest = self.config.ingest
        sock = self.ctx.socket(zmq.PULL if ingest.mode == "pull" else zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, ingest.rcvhwm)
        self.curve = secure_input(self.ctx, sock, self.config, self.log)
        try:
            if ingest.mode == "pull":
                sock.bind(self.endpoint)
            else:
                for prefix in ingest.subscribe:
                    sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
                sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            verb = "bind" if ingest.mode == "pull" else "connect to"
            msg = f"ingest.endpoints: cannot {verb} {self.endpoint}: {zmq.strerror(exc.errno or 0)}"
            raise StartupError(msg) from None
        return sock

    def _open_output(self, worker: int) -> zmq.Socket[Any]:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.config.workers.queue_batches)
        sock.connect(self.paths.worker_endpoint(worker))
        return sock

    # main loop: receive, decode, route ---------------------------------------------------
    def _drain(self) -> None:
        """Receive what the input socket holds (bounded per wake-up), decode it, and dispatch.

        Idle workers get their ticks straight away; when the drain was cut short by its bound,
        the rest is received on the next loop iteration, after timers and acks had their turn.
        """
        if self.overloaded and self.config.ingest.mode == "pull":
            return
        payloads: list[bytes] = []
        started = time.perf_counter()
        exhausted, size = receive_payloads(self.input, payloads, _DRAIN_LIMIT, self.drain_bytes)
        if not exhausted:
            self.loop.call_soon(self._drain)
        if payloads:
            self._accept(payloads, size, time.time_ns())
            self._dispatch()
            self._check_overload()
            self._size_next_drain(size, time.perf_counter() - started)

    def _size_next_drain(self, size: int, seconds: float) -> None:
        """Bound the next drain to about ``_DRAIN_TARGET_S`` of work at this drain's cost per byte.

        A byte of new keys costs the decoder and router some 50 times a byte of known keys', so
        a fixed byte bound let one drain of a new-key flood hold every other tick for 0.25 s.
        """
        if size and seconds > 0:
            self.drain_bytes = int(min(_DRAIN_BYTES, max(_MIN_DRAIN_BYTES, size * _DRAIN_TARGET_S / seconds)))

    def _accept(self, payloads: list[bytes], size: int, recv_ns: int) -> None:
        self.router.epoch = time.monotonic_ns() // EPOCH_NS
        feed = self.cluster_feed
        decoded = decode_payloads(payloads, self.router.codes if feed is None else feed.partition_of)
        metrics = self.metrics
        metrics.messages_received.inc(len(payloads))
        metrics.bytes_received.inc(size)
        # Accepted ticks are held from the moment they count as received: a kill -9 after this
        # point leaves them in the ledger's buffered cell, which the replacement counts as lost.
        metrics.ticks_received.inc(decoded.received)
        self.ledger.buffer(self.index, len(decoded.keys))
        for reason, count in decoded.tick_drops.items():
            metrics.ticks_dropped.labels(reason).inc(count)
        for reason, count in decoded.message_drops.items():
            metrics.messages_dropped.labels(reason).inc(count)
        for reason, example in decoded.examples.items():
            self.limited.warning(reason, "input dropped", reason=reason, example=example)
        if decoded.keys and self.overloaded:
            metrics.ticks_dropped.labels("overload").inc(len(decoded.keys))
            self.ledger.buffer(self.index, -len(decoded.keys))
            self.limited.warning("overload", "over ingest.max_queue_bytes, input shed", ticks=len(decoded.keys))
        elif decoded.keys and feed is not None:
            feed.accept(decoded)
            self.ledger.buffer(self.index, -len(decoded.keys))
        elif decoded.keys:
            self._route(decoded, recv_ns)

    def _route(self, decoded: DecodedTicks, recv_ns: int) -> None:
        router = self.router
        backlog = sum(outbox.fresh_ticks for outbox in self.outboxes)
        router.accept_new = backlog < self.config.ingest.max_queue_bytes // (4 * _BYTES_PER_TICK)
        for worker, part in enumerate(router.split(decoded, self.outboxes)):
            if len(part.t):
                self._buffer(worker, part, recv_ns)
        if router.rejected_ticks:
            self.ledger.buffer(self.index, -router.rejected_ticks)
            self._count_refused_new_keys(backlog)
        self.metrics.keys.set(router.live_keys)

    def _count_refused_new_keys(self, backlog: int) -> None:
        """Ticks of new keys the router refused: beyond state.max_keys, or while the fresh lane is full."""
        router = self.router
        if router.accept_new:
            reason, detail = "key_limit", {"limit": router.max_keys}
            message = "state.max_keys reached: ticks of new keys dropped, known keys keep flowing"
        else:
            reason, detail = "new_key_backlog", {"backlog_ticks": backlog}
            message = "new keys arrive faster than the workers take them: ticks of new keys dropped"
        self.metrics.ticks_dropped.labels(reason).inc(router.rejected_ticks)
        self.limited.warning(reason, message, ticks=router.rejected_ticks, keys=router.rejected_keys, **detail)

    def _buffer(self, worker: int, part: WorkerTicks, recv_ns: int) -> None:
        """Ticks of known keys join the known lane; those of pending keys the fresh lane."""
        outbox = self.outboxes[worker]
        slots, t, p, q, pending = part
        if pending is None:
            outbox.add((slots, t, p, q), recv_ns)
            return
        known = ~pending
        if known.any():
            outbox.add(select((slots, t, p, q), known), recv_ns)
        if not outbox.fresh_ticks:
            outbox.fresh_due_ns = recv_ns + _FRESH_PATIENCE_NS
        outbox.add_fresh(select((slots, t, p, q), pending), recv_ns, self.router.floor(worker, slots[pending]))

    # flow control: when a worker's outbox leaves ------------------------------------------
    def _dispatch(self, *, everything: bool = False) -> None:
        """Send each outbox whose worker is free, or that reached its size or age bound."""
        latency = self.config.latency
        now = time.time_ns()
        next_deadline = 0
        for worker, outbox in enumerate(self.outboxes):
            if not outbox.ticks and not outbox.gone and not outbox.fresh_keys:
                continue
            in_flight = self.ledger.in_flight(self.index, worker)
            fresh_applied = self.ledger.applied(self.index, worker) >= self.fresh_gates[worker]
            fresh_keys = (
                len(outbox.fresh_keys)
                if everything
                else fresh_keys_to_send(outbox, in_flight, latency, now, fresh_applied)
            )
            if fresh_keys is not None:
                self._send(worker, outbox, fresh_keys)
            else:
                due = leaves_by(outbox, latency)
                next_deadline = min(next_deadline or due, due)
        self._arm_deadline(next_deadline)
        self.metrics.new_key_backlog.set(sum(outbox.fresh_ticks for outbox in self.outboxes))

    def _arm_deadline(self, deadline_ns: int) -> None:
        if self.deadline_handle is not None:
            self.deadline_handle.cancel()
            self.deadline_handle = None
        if deadline_ns:
            delay = max(0.0, (deadline_ns - time.time_ns()) / 1e9)
            self.deadline_handle = self.loop.call_later(delay, self._on_deadline)

    def _on_deadline(self) -> None:
        self.deadline_handle = None
        self._dispatch()

    def _check_overload(self) -> None:
        """Bound what this ingest holds to ``ingest.max_queue_bytes``.

        In pull mode the input socket is no longer read, so ZeroMQ's high-water mark pushes back
        on the feed (a PUSH sender blocks or gets EAGAIN); reading resumes below half the bound.
        A SUB socket cannot push back, so in sub mode input keeps being read and is dropped,
        counted under ``overload``.
        """
        held = self.ledger.held(self.index) * _BYTES_PER_TICK
        limit = self.config.ingest.max_queue_bytes
        if not self.overloaded and held >= limit:
            self.overloaded = True
            self.metrics.overloaded.inc()
            self.limited.warning("overload", "ingest.max_queue_bytes reached", held_bytes=held, limit=limit)
        elif self.overloaded and held < limit // 2:
            self.overloaded = False
            self.loop.call_soon(self._drain)

    def _on_acks(self) -> None:
        """A worker applied its batches: whatever waited for it may go now."""
        acked = False
        while True:
            try:
                frame = self.acks.recv(_NOBLOCK)
            except zmq.Again:
                break
            worker, generation = decode_ack(frame)
            acked = acked or generation == self.generations[worker]
        if acked:
            self._dispatch()
            self._check_overload()

    def _send(self, worker: int, outbox: Outbox, fresh_keys: int) -> None:
        """Send the known lane and up to ``fresh_keys`` keys of the fresh lane, in batches of at most
        ``max_batch_size`` ticks; admitted keys are announced in the first, up to ``_GONE_PER_BATCH``
        released slots go with the last (the rest with the next send)."""
        parts: list[Columns] = list(outbox.parts)
        admitted = self.router.admit(worker, outbox, fresh_keys) if fresh_keys else None
        if admitted is not None and len(admitted[1]):
            parts.append(admitted)
        columns = concatenated(parts) if parts else _NO_TICKS
        ticks = len(columns[1])
        oldest_ns = outbox.oldest_ns if outbox.ticks else outbox.fresh_oldest_ns
        self.outboxes[worker] = outbox.fresh_lane()
        if fresh_keys:
            self.outboxes[worker].fresh_due_ns = time.time_ns() + _FRESH_PATIENCE_NS
        size = self.config.latency.max_batch_size
        new_keys = outbox.new_keys
        gone_now, gone_later = outbox.gone[:_GONE_PER_BATCH], outbox.gone[_GONE_PER_BATCH:]
        self._keep_gone(worker, gone_later)
        for start in range(0, max(ticks, 1), size):
            slots, t, p, q = (column[start : start + size] for column in columns)
            gone = gone_now if start + size >= ticks else []
            seq = self.ledger.handed(self.index, worker)
            batch = WorkerBatch(
                slots,
                t,
                p,
                q,
                new_keys,
                oldest_ns,
                self.index,
                self.start.generation,
                self.generations[worker],
                seq,
                gone,
            )
            if self._send_batch(worker, batch):
                new_keys = []
                self.router.recycle(worker, gone)
            self.ledger.buffer(self.index, -len(t))
        if admitted is not None:
            self.fresh_gates[worker] = self.ledger.handed(self.index, worker)

    def _send_batch(self, worker: int, batch: WorkerBatch) -> bool:
        """Queue one batch for a worker; on a full queue drop it (counted) and keep its key announcements."""
        ticks = len(batch.t)
        try:
            self.outputs[worker].send_multipart(encode_batch(batch), zmq.NOBLOCK, copy=ticks < 1024)
        except zmq.Again:
            self.metrics.ticks_dropped.labels("overflow").inc(ticks)
            self.limited.warning("overflow", "worker queue full, batch dropped", worker=worker, ticks=ticks)
            self.outboxes[worker].new_keys.extend(batch.new_keys)
            self._keep_gone(worker, batch.gone)
            return False
        self.ledger.hand_over(self.index, worker, ticks)
        if self.journals is not None:
            self._journal(worker, batch)
        self.metrics.batch_size.observe(ticks)
        self.metrics.batches_sent.labels(str(worker)).inc()
        return True

    def _keep_gone(self, worker: int, gone: list[int]) -> None:
        """Released slots a batch did not carry (it did not leave, or had its share): they go with the next one."""
        if gone:
            outbox = self.outboxes[worker]
            if not outbox.ticks and not outbox.gone:
                outbox.oldest_ns = time.time_ns()
            outbox.gone.extend(gone)

    # bounded state: evict silent keys ----------------------------------------------------
    def _sweep(self) -> None:
        """Evict keys silent for ``state.key_ttl`` (wall clock here), a step at a time so that a
        flood's worth of them never stalls the loop; when a pass is done, come back in a fraction of it."""
        ttl = self.config.state.key_ttl_ns
        router = self.router
        if ttl:
            router.epoch = now = time.monotonic_ns() // EPOCH_NS
            evicted = router.evict_silent(now - ttl // EPOCH_NS, self.outboxes, time.time_ns(), _SWEEP_STEP)
            if evicted:
                self.metrics.keys_released.inc(evicted)
                self.metrics.keys.set(router.live_keys)
                self._dispatch()
        delay_s = 0.0 if router.sweeping else sweep_interval_ns(ttl) / 1e9
        self.sweep_handle = self.loop.call_later(delay_s, self._sweep)

    def _journal(self, worker: int, batch: WorkerBatch) -> None:
        """Keep a handed-over batch until ``worker``'s checkpoint holds it (bounded: evictions are counted)."""
        assert self.journals is not None
        journal = self.journals[worker]
        journal.trim(self.ledger.checkpointed(self.index, worker))
        evicted = journal.record(JournalEntry(batch.seq_start, batch.slots, batch.t, batch.p, batch.q))
        if evicted:
            self.metrics.journal_evicted.inc(evicted)
            self.limited.warning(
                "journal_full",
                "replay journal full (state.journal_bytes): oldest ticks evicted, not replayable if the worker dies",
                worker=worker,
                ticks=evicted,
            )

    def _replay(self, worker: int) -> int:
        """Send the replacement of ``worker`` what its checkpoint lacks; return the ticks lost.

        The replacement loads the checkpoint and skips what it already holds. Ticks handed over
        and never applied that the journal no longer has are lost (``worker_lost``); if the
        worker's queue cannot take the replay, everything not applied is written off as before.
        """
        assert self.journals is not None
        journal = self.journals[worker]
        journal.trim(self.ledger.checkpointed(self.index, worker))
        handed, applied = self.ledger.handed(self.index, worker), self.ledger.applied(self.index, worker)
        start = journal.start if journal.start is not None else handed
        lost = max(0, start - applied)
        if lost:
            self.ledger.mark_applied(self.index, worker, start)
        announcement = self.router.announcement(worker)
        replayed = 0
        for entry in journal.replay(self.config.latency.max_batch_size):
            batch = WorkerBatch(
                entry.slots, entry.t, entry.p, entry.q, announcement, time.time_ns(), self.index,
                self.start.generation, self.generations[worker], entry.seq,
            )  # fmt: skip
            try:
                self.outputs[worker].send_multipart(encode_batch(batch), zmq.NOBLOCK)
            except zmq.Again:
                self.log.error("worker queue full during replay: the rest is written off", extra={"worker": worker})
                return lost + self.ledger.write_off(self.index, worker)
            announcement = []
            replayed += len(entry.t)
        self.outboxes[worker].new_keys = announcement
        self.metrics.replayed.inc(replayed)
        self.log.warning(
            "worker lost: replaying the ticks its checkpoint lacks",
            extra={"worker": worker, "replayed_ticks": replayed, "lost_ticks": lost},
        )
        return lost

    # control ------------------------------------------------------------------------------
    def _on_control(self) -> None:
        while self.conn.poll():
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                self._on_supervisor_gone()
                return
            if isinstance(message, Stop):
                self._stop_intake()
            elif isinstance(message, WorkerLost):
                self._reset_worker(message.worker, message.generation)
            elif isinstance(message, Reload):
                self._reload(message.config)

    def _on_supervisor_gone(self) -> None:
        """The supervisor died: nobody can restart or stop us properly, so free the port and exit."""
        self.log.error("supervisor is gone; ingest exiting")
        self.orphaned = True
        self.loop.remove_reader(self.conn.fileno())
        self.loop.remove_reader(self.input.fileno())
        self.stopped.set()

    def _reset_worker(self, worker: int, generation: int) -> None:
        """Account for what died with a worker and start its queue afresh for the replacement.

        Closing the PUSH socket with linger 0 discards batches still queued for the dead
        process, and any that slipped through carry the old generation, which the replacement
        discards: the ledger's write-off is exactly what was lost. Ticks still buffered here
        were never handed over; they go to the replacement, after every key of the worker is
        announced to it again.
        """
        self.outputs[worker].close(0)
        self.outputs[worker] = self._open_output(worker)
        self.generations[worker] = generation
        if self.journals is not None:
            lost = self._replay(worker)
        else:
            lost = self.ledger.write_off(self.index, worker)
            self.outboxes[worker].new_keys = self.router.announcement(worker)
            self.log.warning("worker lost, its queue was reset", extra={"worker": worker, "lost_ticks": lost})
        if lost:
            self.metrics.ticks_dropped.labels("worker_lost").inc(lost)
        self.conn.send(WorkerReset(worker, lost))
        self._dispatch()

    def _reload(self, config: Config) -> None:
        self.config = config
        self.router.max_keys = config.state.max_keys_per_ingest(len(config.ingest.endpoints))
        apply_log_config(config.log)
        self.limited = RateLimiter(self.log, config.log.rate_limit_per_s)
        if self.curve is not None:
            self.curve.reload()
        self._dispatch()
        self.log.info("batching and logging reloaded")

    def _stop_intake(self) -> None:
        """Receive what already arrived (bounded by the socket's queue), hand it all over, then end input."""
        self.loop.remove_reader(self.input.fileno())
        deadline = time.monotonic() + self.config.shutdown.graceful_timeout_ns / 2e9
        while time.monotonic() < deadline:
            payloads: list[bytes] = []
            exhausted, size = receive_payloads(self.input, payloads, _DRAIN_LIMIT, _DRAIN_BYTES)
            if payloads:
                self._accept(payloads, size, time.time_ns())
            if exhausted:
                break
        self.input.close(0)
        self._dispatch(everything=True)
        for sock in self.outputs:
            sock.send_multipart(encode_end_of_input(self.index))
        self.stopped.set()

    async def serve(self) -> None:
        await self.stopped.wait()

    def shutdown(self) -> None:
        self.input.close(0)
        self.acks.close(0)
        for sock in self.outputs:
            sock.close(0 if self.orphaned else 5000)
        self.ctx.term()
        self.log.info("ingest stopped")


async def _run(ingest: Ingest) -> None:
    await ingest.start_cluster_feed()
    ingest.startup()
    await ingest.serve()
    if ingest.cluster_feed is not None:
        await ingest.cluster_feed.close(0 if ingest.orphaned else ingest.config.shutdown.graceful_timeout_ns / 2e9)


@dataclass(frozen=True)
class IngestStart:
    """Who an ingest process is: its endpoint index, its incarnation, and what it inherits."""

    index: int
    generation: int = 0  # 0 at daemon start, +1 for each replacement of a dead ingest
    worker_generations: tuple[int, ...] = ()
    write_off: tuple[int, ...] = ()  # workers that died while this ingest's predecessor was dead


_Child = TypeVar("_Child", bound="Ingest")


def run_child(
    name: str, build: Callable[[], _Child], lifetime: Callable[[_Child], Coroutine[Any, Any, None]], conn: Connection
) -> None:
    """Run an ingest-shaped child to its end: the ingest processes and the cluster reader share this.

    The process is named, leaves SIGINT to the supervisor and dies with it; ``build`` runs only
    then (it sets up logging and metrics); a start-up error is reported as :class:`Failed`.
    """
    name_process(name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    child = build()
    freeze_startup_objects()
    try:
        uvloop.run(lifetime(child))
    except StartupError as exc:
        conn.send(Failed(str(exc)))
        sys.exit(1)
    child.shutdown()


def ingest_main(start: IngestStart, config: Config, paths: RuntimePaths, ledger: TickLedger, conn: Connection) -> None:
    """Entry point of an ingest process (started with the ``spawn`` context)."""
    run_child(f"streamd-ingest{start.index}", lambda: Ingest(start, config, paths, ledger, conn), _run, conn)
