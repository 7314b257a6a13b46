"""Thin JetStream wrappers that add what nats-py lacks: bounded publishes and an ordered reader we can trust.

What nats-py does not give us, and this module adds:

- ``js.publish`` waits one timeout and gives up; ``publish_async`` has no timeout at all.
  :func:`publish_idempotent` retries with the same ``Nats-Msg-Id`` until a deadline, so a
  publish that rides out a stream-leader election (measured: 4.6 s on loopback) is stored
  once, and reports how long it stalled.
- :class:`PartitionPublisher`: one bounded buffer and one publish in flight per partition
  (a partition's batches stay in order through retries), dropping and counting when a
  buffer is full rather than blocking the ingest.
- nats-py's ordered consumer trusts its own sequence tracking, which a slow-consumer drop
  can skip past silently. :class:`OrderedReader` runs its own ordered push consumer: it
  checks every consumer sequence, answers flow control, watches idle heartbeats, and on a
  gap or silence recreates the consumer from the last stream sequence it *yielded*. The
  position lives in the client, never in a server-side ack (AckAll pull consumers lost
  acknowledged batches in our tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck, StorageType, StreamConfig, StreamInfo

TICKS_STREAM = "STREAMD_TICKS"
TICKS_SUBJECTS = "streamd.ticks.*"
DUPLICATE_WINDOW_S = 120.0  # retries with one message id within this window are stored once
DEFAULT_RETENTION_S = 3600.0  # must exceed the longest window plus the replay margin
_ATTEMPT_TIMEOUT_S = 0.5
_RETRYABLE = (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError)
_JS_ACK_TOKENS_V1 = 9  # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>


def ticks_subject(partition: int) -> str:
    """The subject a partition's tick batches are published on."""
    return f"streamd.ticks.{partition}"


async def connect(servers: list[str], name: str) -> Client:
    """A connection that fails over between cluster servers quickly and never gives up reconnecting."""
    return await nats.connect(servers, name=name, reconnect_time_wait=0.2, max_reconnect_attempts=-1, connect_timeout=2)


async def cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended.

    Once is not always enough: Python 3.11's ``asyncio.wait_for`` (nats-py's watcher and our
    bounded operations are built on it) swallows a cancellation that lands just as its inner
    wait completes, and the task runs on. So it is cancelled again until it ends.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)


async def ensure_ticks_stream(
    js: JetStreamContext, replicas: int, retention_s: float = DEFAULT_RETENTION_S
) -> StreamInfo:
    """Create the ticks stream, or bring an existing one to ``replicas`` and ``retention_s``."""
    config = StreamConfig(
        name=TICKS_STREAM,
        subjects=[TICKS_SUBJECTS],
        num_replicas=replicas,
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_S,
        max_age=retention_s,
    )
    try:
        info = await js.stream_info(TICKS_STREAM)
    except nats.js.errors.NotFoundError:
        return await js.add_stream(config)
    current = info.config
    if (current.num_replicas, current.max_age, current.duplicate_window) != (replicas, retention_s, DUPLICATE_WINDOW_S):
        return await js.update_stream(config)
    return info


class PublishTimeoutError(TimeoutError):
    """JetStream did not acknowledge a publish before its deadline (every attempt used the same id)."""


@dataclass(frozen=True)
class Published:
    """The outcome of one acknowledged publish."""

    ack: PubAck
    attempts: int
    seconds: float  # from the first attempt to the acknowledgement


async def publish_idempotent(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    msg_id: str,
    timeout: float,
    attempt_timeout: float = _ATTEMPT_TIMEOUT_S,
) -> Published:
    """Publish until acknowledged or ``timeout``; every retry carries ``msg_id``, so the stream stores it once."""
    started = time.monotonic()
    deadline = started + timeout
    attempts = 0
    while True:
        attempts += 1
        remaining = deadline - time.monotonic()
        try:
            ack = await js.publish(
                subject, payload, timeout=max(0.01, min(attempt_timeout, remaining)), headers={"Nats-Msg-Id": msg_id}
            )
        except _RETRYABLE:
            if time.monotonic() >= deadline:
                msg = f"publish to {subject} not acknowledged within {timeout} s ({attempts} attempts)"
                raise PublishTimeoutError(msg) from None
            await asyncio.sleep(min(0.05 * attempts, 0.25))
            continue
        return Published(ack, attempts, time.monotonic() - started)


@dataclass
class PublisherStats:
    """What :class:`PartitionPublisher` did, for metrics: counters only ever grow."""

    published: int = 0
    duplicates: int = 0  # acknowledged as already stored: a retry of a batch that had made it
    dropped: int = 0  # batches refused because their partition's buffer was full
    failed: int = 0  # batches given up after ``publish_timeout``
    stalls: int = 0  # publishes that needed more than one attempt
    stalled_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)  # drained by the metrics exporter


class PartitionPublisher:
    """Per-partition bounded buffers, each drained by one task with one publish in flight.

    Message ids are ``<instance>.<epoch>.<partition>.<n>``: unique per batch, the same for every
    retry of it, and never reused by a restarted instance (a new epoch).
    """

    def __init__(
        self,
        js: JetStreamContext,
        instance: str,
        partitions: int,
        buffer_batches: int = 1000,
        publish_timeout: float = 30.0,
        epoch: int | None = None,
        on_outcome: Callable[[int, int, Published | None], None] | None = None,
    ) -> None:
        self.js = js
        self.on_outcome = on_outcome  # (partition, ticks, result or None when given up) after each batch
        self.prefix = f"{instance}.{epoch if epoch is not None else time.time_ns()}"
        self.buffer_batches = buffer_batches
        self.publish_timeout = publish_timeout
        self.stats = PublisherStats()
        self._buffers: list[deque[tuple[str, bytes, int]]] = [deque() for _ in range(partitions)]
        self._counters = [0] * partitions
        self._wakeups = [asyncio.Event() for _ in range(partitions)]
        self._idle = [asyncio.Event() for _ in range(partitions)]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for event in self._idle:
            event.set()
        self._tasks = [asyncio.create_task(self._drain(p)) for p in range(len(self._buffers))]

    def submit(self, partition: int, payload: bytes, ticks: int = 0) -> bool:
        """Queue a batch of ``ticks`` ticks without waiting; False (and counted) when the partition's buffer is full."""
        buffer = self._buffers[partition]
        if len(buffer) >= self.buffer_batches:
            self.stats.dropped += 1
            return False
        self._counters[partition] += 1
        buffer.append((f"{self.prefix}.{partition}.{self._counters[partition]}", payload, ticks))
        self._idle[partition].clear()
        self._wakeups[partition].set()
        return True

    def buffered(self) -> int:
        return sum(map(len, self._buffers))

    def buffered_ticks(self) -> int:
        """Ticks of every batch queued or in flight (as given to :meth:`submit`)."""
        return sum(ticks for buffer in self._buffers for _, _, ticks in buffer)

    def idle(self, partition: int) -> bool:
        """Nothing queued or in flight for ``partition``: a new batch would be published at once."""
        return self._idle[partition].is_set()

    async def flush(self) -> None:
        """Wait until every buffer is empty and nothing is in flight."""
        await asyncio.gather(*(event.wait() for event in self._idle))

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)

    async def _drain(self, partition: int) -> None:
        buffer = self._buffers[partition]
        subject = ticks_subject(partition)
        while True:
            if not buffer:
                self._idle[partition].set()
                self._wakeups[partition].clear()
                await self._wakeups[partition].wait()
                continue
            msg_id, payload, ticks = buffer[0]
            result: Published | None = None
            try:
                result = await publish_idempotent(self.js, subject, payload, msg_id, self.publish_timeout)
            except PublishTimeoutError:
                self.stats.failed += 1
            else:
                self._count(result)
            buffer.popleft()
            if not buffer:
                self._idle[partition].set()
            if self.on_outcome is not None:
                self.on_outcome(partition, ticks, result)

    def _count(self, result: Published) -> None:
        stats = self.stats
        stats.published += 1
        stats.duplicates += bool(result.ack.duplicate)
        stats.latencies_s.append(result.seconds)
        if result.attempts > 1:
            stats.stalls += 1
            stats.stalled_s += result.seconds


class Delivery(NamedTuple):
    """One stream message as the reader yields it."""

    seq: int  # stream sequence: the client's position
    payload: bytes
    pending: int  # messages of this subject after this one when it was sent: 0 = caught up
    time_ns: int  # when the stream stored it


@dataclass
class ReaderStats:
    resets: int = 0  # consumer recreated after a gap or silence
    stalls: int = 0  # heartbeats missed: the consumer's server or the stream leader went away
    stalled_s: float = 0.0


class OrderedReader:
    """Read one subject of a stream in order, from a sequence or a time, surviving server loss.

    Iterate with ``async for delivery in reader``. ``on_stall(seconds_silent)`` is called each
    time the reader gives up waiting for a heartbeat and recreates its consumer.
    """

    def __init__(
        self,
        nc: Client,
        stream: str,
        subject: str,
        *,
        start_seq: int | None = None,
        start_time_ns: int | None = None,
        heartbeat: float = 1.0,
        on_stall: Callable[[float], None] | None = None,
    ) -> None:
        self.nc = nc
        self.stream = stream
        self.subject = subject
        self.start_time_ns = start_time_ns
        self.last_seq = (start_seq - 1) if start_seq else 0  # the last sequence yielded
        self.heartbeat = heartbeat
        self.on_stall = on_stall
        self.stats = ReaderStats()
        self._sub: Subscription | None = None
        self._consumer: str | None = None
        self._expected_dseq = 1

    def _consumer_config(self, inbox: str) -> ConsumerConfig:
        config = ConsumerConfig(
            deliver_subject=inbox,
            filter_subject=self.subject,
            ack_policy=AckPolicy.NONE,
            max_deliver=1,
            flow_control=True,
            idle_heartbeat=self.heartbeat,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=max(5.0, 5 * self.heartbeat),
        )
        if self.last_seq:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = self.last_seq + 1
        elif self.start_time_ns is not None:
            config.deliver_policy = DeliverPolicy.BY_START_TIME
            config.opt_start_time = datetime.datetime.fromtimestamp(self.start_time_ns / 1e9, datetime.UTC)
        else:
            config.deliver_policy = DeliverPolicy.ALL
        return config

    async def _open(self) -> None:
        """(Re)create the consumer after the last yielded sequence; retry while the cluster elects."""
        await self._close()
        jsm = self.nc.jsm()
        delay = 0.05
        while True:
            inbox = self.nc.new_inbox()
            sub = await self.nc.subscribe(inbox, pending_msgs_limit=0, pending_bytes_limit=256 << 20)
            try:
                info = await jsm.add_consumer(self.stream, self._consumer_config(inbox), timeout=2)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.APIError):
                await sub.unsubscribe()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self._sub, self._consumer, self._expected_dseq = sub, info.name, 1
            return

    async def _close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.jsm().delete_consumer(self.stream, consumer), 1)

    async def close(self) -> None:
        await self._close()

    async def __aiter__(self) -> AsyncGenerator[Delivery, None]:
        await self._open()
        try:
            while True:
                delivery = await self._next()
                if delivery is not None:
                    self.last_seq = delivery.seq
                    yield delivery
        finally:
            await self._close()

    async def _next(self) -> Delivery | None:
        """The next in-order message, or None after handling a control message or a reset."""
        assert self._sub is not None
        silence = 2 * self.heartbeat + 0.5
        try:
            msg = await self._sub.next_msg(timeout=silence)
        except nats.errors.TimeoutError:
            self.stats.stalls += 1
            self.stats.stalled_s += silence
            if self.on_stall is not None:
                self.on_stall(silence)
            await self._reset()
            return None
        if not msg.data and msg.headers and msg.headers.get("Status") == "100":
            await self._on_control(msg)
            return None
        return await self._on_data(msg)

    async def _on_control(self, msg: Msg) -> None:
        headers = msg.headers or {}
        if msg.reply:  # a flow-control request: answered only once we have read up to it
            await self.nc.publish(msg.reply)
        stalled = headers.get("Nats-Consumer-Stalled")
        if stalled:
            await self.nc.publish(stalled)
        last = headers.get("Nats-Last-Consumer")
        if last is not None and int(last) != self._expected_dseq - 1:
            await self._reset()

    async def _on_data(self, msg: Msg) -> Delivery | None:
        tokens = (msg.reply or "").split(".")
        if len(tokens) < _JS_ACK_TOKENS_V1 or tokens[:2] != ["$JS", "ACK"]:
            return None
        # v2 reply subjects (with a domain) add tokens in front and a random token at the end
        numbers = tokens[5:9] if len(tokens) == _JS_ACK_TOKENS_V1 else tokens[-5:-1]
        stream_seq, consumer_seq, stamp, pending = (int(x) for x in numbers)
        if consumer_seq != self._expected_dseq:
            await self._reset()
            return None
        self._expected_dseq += 1
        if stream_seq <= self.last_seq:
            return None
        return Delivery(stream_seq, msg.data, pending, stamp)

    async def _reset(self) -> None:
        self.stats.resets += 1
        await self._open()
