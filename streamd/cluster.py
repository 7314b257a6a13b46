"""Cluster process: one per instance with ``[cluster]``; reads the partitions this instance owns.

It holds this instance's partition leases (:class:`streamd.leases.LeaseManager`) and, for each
partition it owns, an :class:`streamd.jetstream.OrderedReader` on ``streamd.ticks.<p>``.
Towards the workers it is one more ingest (index ``len(ingest.endpoints)``): it decodes what it
reads, shards it with the same router, and hands it over under the same flow control, ledger
and worker-restart protocol, which it inherits from :class:`streamd.ingest.Ingest`.

A takeover rebuilds windows before it publishes. On acquiring partition ``p`` with fencing
token ``T`` it tells every worker, in-band, ``PartitionOwned(p, T, live=False)`` and reads
``p`` from a replay horizon (:func:`streamd.clusterfeed.replay_horizon_ns`) before the earlier
of now (less twice the lease TTL and a second of clock skew) and the partition's published
position (:mod:`streamd.positions`). The workers apply those ticks without publishing. Past
that position (or the partition's last message at takeover, if earlier) every outbox is
flushed and ``PartitionOwned(p, T, live=True)`` follows, so the first records published for
``p`` equal an uninterrupted computation, stamped with ``T``, and no tick goes without one.
Losing or releasing ``p`` stops its reader, flushes, and sends ``PartitionDropped(p)``: the
workers forget those keys' windows.

On ``Stop`` (SIGTERM) it stops reading, waits (bounded) until the workers applied what it
handed them, so its last records go out, and only then releases its leases: a successor takes
over at once instead of after the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import nats.errors
import nats.js.errors
import zmq

from streamd.clusterfeed import replay_horizon_ns, retried, stream_retention_s
from streamd.config import Config
from streamd.control import Ready
from streamd.ingest import Ingest, IngestStart, run_child
from streamd.jetstream import TICKS_STREAM, OrderedReader, connect, ensure_ticks_stream, ticks_subject
from streamd.leases import LeaseEvent, LeaseManager
from streamd.ledger import TickLedger
from streamd.logs import setup_logging
from streamd.metrics import ClusterMetrics
from streamd.positions import Position, PositionBook, positions_bucket, read_position, write_positions
from streamd.protocol import decode_payloads
from streamd.runtime import RuntimePaths, StartupError
from streamd.transport import PartitionOwned, encode_end_of_input, encode_partition_dropped, encode_partition_owned

_BYTES_PER_TICK = 32
_YIELD_EVERY = 64  # deliveries handled before letting acks and timers run
_CONNECT_TIMEOUT_S = 30.0
_SKEW_MARGIN_NS = 1_000_000_000
_REREAD_AFTER_S = 1.0  # a reader that failed is started again after this pause, not in a hot loop


def takeover_start_ns(config: Config, now_ns: int) -> int:
    """Where a takeover's replay starts (stream time): the replay horizon plus twice the TTL and a second."""
    assert config.cluster is not None
    return now_ns - replay_horizon_ns(config) - 2 * config.cluster.lease_ttl_ns - _SKEW_MARGIN_NS


def _epoch_ns(stamp: datetime.datetime | str | None) -> int:
    if isinstance(stamp, datetime.datetime):
        return int(stamp.timestamp() * 1e9)
    return time.time_ns()  # unknown: treat the message as recent, so the replay waits for it


@dataclass(frozen=True)
class Takeover:
    """Where a takeover's replay starts and which of its messages stay silent.

    Silent ends at the earlier of the partition's published position (:mod:`streamd.positions`)
    and its last message at takeover, so ticks that arrived while nobody owned it (a crash, or
    every lease lapsing in an election) are published now. With no position on record (its
    owner died before writing one), everything from ``exact_from_ns`` on is published: the
    replay holds a full horizon before those ticks, so their records are exact, and the
    previous owner may have published some of them too.
    """

    start_ns: int
    silent_until: int  # the last sequence that may stay silent; 0: live at once
    published: Position | None
    exact_from_ns: int

    def silent(self, seq: int, time_ns: int) -> bool:
        if seq > self.silent_until:
            return False
        return self.published is not None or time_ns < self.exact_from_ns

    def describe(self) -> dict[str, int | None]:
        published = self.published.seq if self.published is not None else None
        return {"published_seq": published, "silent_until": self.silent_until}


class ClusterReader(Ingest):
    """The cluster process: leases, one reader per owned partition, and the ingest's worker side."""

    def __init__(
        self, start: IngestStart, config: Config, paths: RuntimePaths, ledger: TickLedger, conn: Connection
    ) -> None:
        super().__init__(start, config, paths, ledger, conn)
        assert config.cluster is not None
        self.cluster = config.cluster
        self.log = setup_logging(config.log, "cluster")
        self.cluster_metrics = ClusterMetrics()
        self.readers: dict[int, asyncio.Task[None]] = {}
        self.tokens: dict[int, int] = {}
        self.replaying: set[int] = set()
        self.cancelled: set[asyncio.Task[None]] = set()  # readers told to stop, awaited before the connection closes
        self.leaving = False
        workers = range(self.workers)
        self.book = PositionBook(
            handed=lambda: [ledger.handed(self.index, w) for w in workers],
            applied=lambda: [ledger.applied(self.index, w) for w in workers],
        )

    # start-up -------------------------------------------------------------------------
    def startup(self) -> None:
        """Worker-side sockets only: the input is JetStream (``join``), not a ZeroMQ endpoint."""
        self.ctx = zmq.Context()
        self.acks = self.ctx.socket(zmq.PULL)
        self.acks.setsockopt(zmq.LINGER, 0)
        self.acks.bind(self.paths.ack_endpoint(self.index))
        self.outputs = [self._open_output(i) for i in range(self.workers)]
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.acks.fileno(), self._on_acks)
        self.loop.add_reader(self.conn.fileno(), self._on_control)
        self._settle_predecessor()

    async def join(self) -> None:
        """Connect, make sure the stream exists, and start taking leases; then report ready."""
        cluster = self.cluster
        try:
            self.nc = await asyncio.wait_for(
                connect(list(cluster.servers), f"{cluster.name}-cluster-g{self.start.generation}"), _CONNECT_TIMEOUT_S
            )
            js = self.nc.jetstream(timeout=5)
            await retried(lambda: ensure_ticks_stream(js, cluster.replicas, stream_retention_s(self.config)))
            self.leases = LeaseManager(
                self.nc,
                cluster.name,
                cluster.partitions,
                cluster.lease_ttl_ns / 1e9,
                replicas=cluster.replicas,
                on_change=self._on_lease,
            )
            await retried(self.leases.start)
            self.positions = await retried(lambda: positions_bucket(js, cluster.replicas))
        except Exception as exc:  # whatever fails here, the instance cannot join
            msg = f"cluster.servers: cannot join the cluster at {', '.join(cluster.servers)}: {exc!r}"
            raise StartupError(msg) from None
        self.log.info(
            "cluster process started",
            extra={"instance": cluster.name, "partitions": cluster.partitions, "generation": self.start.generation},
        )
        self.position_task = asyncio.create_task(self._record_positions())
        self.conn.send(Ready())

    # ownership --------------------------------------------------------------------------
    def _on_lease(self, event: LeaseEvent) -> None:
        self.cluster_metrics.lease_changes.labels(event.kind).inc()
        if event.kind == "acquired" and self.leaving:
            pass  # released again by the leave in progress, never read
        elif event.kind == "acquired":
            self._start_reading(event.partition, event.token)
        else:
            self._stop_reading(event.partition)
            self.book.forget(event.partition)
            self._to_workers(encode_partition_dropped(event.partition))
        self.cluster_metrics.owned.set(len(self.readers))
        self.log.info("lease " + event.kind, extra={"partition": event.partition, "token": event.token})

    def _start_reading(self, partition: int, token: int) -> None:
        self.tokens[partition] = token
        task = asyncio.create_task(self._follow(partition, token))
        task.add_done_callback(lambda done: self._on_reader_done(partition, token, done))
        self.readers[partition] = task

    def _on_reader_done(self, partition: int, token: int, task: asyncio.Task[None]) -> None:
        """A reader that failed while still current takes its partition over again, from the replay.

        Without this, an error the reader did not expect (a connection error in the middle of a
        server's failover) would leave the partition owned and never read again.
        """
        if task.cancelled() or task.exception() is None or self.readers.get(partition) is not task:
            return
        self.cluster_metrics.reader_failures.inc()
        self.limited.warning(
            "reader_failed",
            "partition reader failed; taking the partition over again in a second",
            partition=partition,
            token=token,
            error=repr(task.exception()),
        )
        self._stop_reading(partition)
        self._to_workers(encode_partition_dropped(partition))
        self.tokens[partition] = token
        self.loop.call_later(_REREAD_AFTER_S, self._reread, partition, token)

    def _reread(self, partition: int, token: int) -> None:
        """Read a partition whose reader failed again, if it is still ours under the same term."""
        if self.tokens.get(partition) == token and partition not in self.readers and not self.leaving:
            self._start_reading(partition, token)

    def _stop_reading(self, partition: int) -> None:
        """Stop the reader: it is between two deliveries, so nothing of it is half handed over.

        Cancelling is not enough on its own (nats-py swallows a cancellation that lands in a
        flush), so a reader also checks, before each delivery, that it is still the current one.
        """
        task = self.readers.pop(partition, None)
        self.tokens.pop(partition, None)
        if task is not None:
            task.cancel()
            self.cancelled.add(task)
            task.add_done_callback(self.cancelled.discard)
        if partition in self.replaying:
            self.replaying.discard(partition)
            self.cluster_metrics.replaying.dec()

    def _to_workers(self, frames: list[bytes]) -> None:
        """An in-band message to every worker, after everything handed over before it."""
        self._dispatch(everything=True)
        for sock in self.outputs:
            with contextlib.suppress(zmq.Again):
                sock.send_multipart(frames, zmq.NOBLOCK)

    async def _follow(self, partition: int, token: int) -> None:
        """Replay ``partition`` silently up to where its output stood, then hand it over live."""
        acquired = time.monotonic()
        plan = await self._plan_takeover(partition)
        if not self._current(partition):
            return
        self.log.info("taking over partition", extra={"partition": partition, "token": token, **plan.describe()})
        live = plan.silent_until == 0
        if not live:
            self.replaying.add(partition)
            self.cluster_metrics.replaying.inc()
        self._to_workers(encode_partition_owned(PartitionOwned(partition, token, live)))
        reader = OrderedReader(
            self.nc, TICKS_STREAM, ticks_subject(partition), start_time_ns=plan.start_ns, on_stall=self._on_stall
        )
        handled = 0
        async with contextlib.aclosing(aiter(reader)) as deliveries:
            async for delivery in deliveries:
                await self._room_for_more()
                if not self._current(partition):
                    return
                if not live and not plan.silent(delivery.seq, delivery.time_ns):
                    live = True
                    self._go_live(partition, token, time.monotonic() - acquired)
                self._hand_over(delivery.payload, "live" if live else "replay")
                self.book.handed_over(partition, Position(delivery.seq, delivery.time_ns))
                if not live and (delivery.seq >= plan.silent_until or delivery.pending == 0):
                    live = True
                    self._go_live(partition, token, time.monotonic() - acquired)
                handled += 1
                if handled % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)

    async def _plan_takeover(self, partition: int) -> Takeover:
        """Ask for the published position and the partition's last message together (both wait out elections)."""
        start_ns = takeover_start_ns(self.config, time.time_ns())
        published, last = await asyncio.gather(read_position(self.positions, partition), self._last_message(partition))
        if published is not None:
            start_ns = min(start_ns, published.time_ns - replay_horizon_ns(self.config) - _SKEW_MARGIN_NS)
        catch_up = last.seq if last is not None and last.time_ns >= start_ns else 0
        silent_until = catch_up if published is None else min(catch_up, published.seq)
        return Takeover(start_ns, silent_until, published, start_ns + replay_horizon_ns(self.config))

    async def _record_positions(self) -> None:
        """Every lease interval: commit where the output of live partitions stands (see :mod:`streamd.positions`)."""
        interval = self.cluster.lease_ttl_ns / 3e9
        while True:
            await asyncio.sleep(interval)
            self._dispatch(everything=True)
            committed = self.book.advance(flushed=not any(outbox.ticks for outbox in self.outboxes))
            live = {p: pos for p, pos in committed.items() if p in self.readers and p not in self.replaying}
            if live:
                await write_positions(self.positions, live, interval)

    def _current(self, partition: int) -> bool:
        return self.readers.get(partition) is asyncio.current_task()

    async def _last_message(self, partition: int) -> Position | None:
        """The partition's last stream message now (sequence and time), None if it has none."""
        jsm = self.nc.jsm()
        while True:
            try:
                last = await jsm.get_last_msg(TICKS_STREAM, ticks_subject(partition))
            except nats.js.errors.NotFoundError:
                return None
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
                await asyncio.sleep(0.2)  # the stream is electing a leader: try again
                continue
            return Position(int(last.seq or 0), _epoch_ns(last.time))

    def _go_live(self, partition: int, token: int, seconds: float) -> None:
        self.replaying.discard(partition)
        self.cluster_metrics.replaying.dec()
        self.cluster_metrics.replay_seconds.observe(seconds)
        self._to_workers(encode_partition_owned(PartitionOwned(partition, token, live=True)))
        self.log.info("partition live", extra={"partition": partition, "token": token, "replay_s": round(seconds, 3)})

    def _hand_over(self, payload: bytes, phase: str) -> None:
        decoded = decode_payloads([payload], self.router.codes)
        self.cluster_metrics.read.labels(phase).inc(decoded.received)
        for reason, count in decoded.tick_drops.items():
            self.metrics.ticks_dropped.labels(reason).inc(count)
        if decoded.keys:
            self._route(decoded, time.time_ns())
            self._dispatch()

    async def _room_for_more(self) -> None:
        """Stop reading (JetStream flow control then holds the rest) while the workers hold too much of ours."""
        limit = self.config.ingest.max_queue_bytes
        while self.ledger.held(self.index) * _BYTES_PER_TICK >= limit:
            await asyncio.sleep(0.01)

    def _check_overload(self) -> None:
        """Nothing to pause here: :meth:`_room_for_more` holds the readers back instead."""

    def _on_stall(self, seconds: float) -> None:
        self.cluster_metrics.reader_stalls.inc()
        self.cluster_metrics.reader_stalled.inc(seconds)

    def _reset_worker(self, worker: int, generation: int) -> None:
        """A replacement worker has no windows: every owned partition is taken over again, by replay."""
        super()._reset_worker(worker, generation)
        self.book.reset()
        for partition, token in list(self.tokens.items()):
            self._stop_reading(partition)
            self._to_workers(encode_partition_dropped(partition))
            self._start_reading(partition, token)

    # shutdown ---------------------------------------------------------------------------
    def _stop_intake(self) -> None:
        self.leaving = True
        self._leave_task = asyncio.create_task(self._leave())

    async def _leave(self) -> None:
        """Stop reading, let the workers publish what we handed them, then release every lease."""
        self.position_task.cancel()
        owned = set(self.readers) - self.replaying
        for partition in list(self.readers):
            self._stop_reading(partition)
        if self.cancelled:
            await asyncio.wait(self.cancelled, timeout=1)
        self._dispatch(everything=True)
        deadline = time.monotonic() + self.config.shutdown.graceful_timeout_ns / 2e9
        while time.monotonic() < deadline and self._handed_unapplied():
            await asyncio.sleep(0.01)
        final = {p: pos for p, pos in self.book.settled().items() if p in owned}
        await write_positions(self.positions, final, 1.0)
        await self.leases.stop(release=True)
        for sock in self.outputs:
            sock.send_multipart(encode_end_of_input(self.index))
        self.stopped.set()

    def _handed_unapplied(self) -> bool:
        return any(self.ledger.in_flight(self.index, worker) > 0 for worker in range(self.workers))

    def _on_supervisor_gone(self) -> None:
        self.log.error("supervisor is gone; cluster process exiting (its leases will expire)")
        self.orphaned = True
        self.loop.remove_reader(self.conn.fileno())
        self.stopped.set()

    def shutdown(self) -> None:
        self.acks.close(0)
        for sock in self.outputs:
            sock.close(0 if self.orphaned else 5000)
        self.ctx.term()
        self.log.info("cluster process stopped")


async def _run(reader: ClusterReader) -> None:
    reader.startup()
    await reader.join()
    await reader.serve()
    reader.position_task.cancel()
    if reader.orphaned:
        await reader.leases.stop(release=False)
    if reader.cancelled:
        await asyncio.wait(reader.cancelled, timeout=1)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(reader.nc.close(), 2)


def cluster_main(start: IngestStart, config: Config, paths: RuntimePaths, ledger: TickLedger, conn: Connection) -> None:
    """Entry point of the cluster process (started with the ``spawn`` context)."""
    run_child("streamd-cluster", lambda: ClusterReader(start, config, paths, ledger, conn), _run, conn)
