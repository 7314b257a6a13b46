"""The ingest's way out in cluster mode: ticks go to JetStream by partition, not to local workers.

Each decoded flush is split by partition (a ``key -> partition`` cache, filled by
:func:`streamd.partitions.partitions_for` for keys never seen, and handed to the decoder as its
``known`` keys so a known key is looked up once) and buffered per partition. A partition's
buffer leaves as one columnar batch (:func:`streamd.protocol.encode_columnar_bin`) when nothing
of that partition is being published, or once it holds ``latency.max_batch_size`` ticks: the
same flow control as towards the workers, so a slow acknowledgement (an election) makes fewer,
larger batches instead of a queue of small ones. :class:`streamd.jetstream.PartitionPublisher`
publishes them in order, one in flight per partition, idempotent by message id.

Accounting of an ingest in cluster mode (once idle): ``received == published_to_cluster +
sum(dropped)``, where the reasons a cluster ingest adds are ``cluster_overflow`` (a partition's
buffer was full) and ``cluster_publish_failed`` (not acknowledged within the publish timeout,
or still unacknowledged when the ingest stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np

from streamd.config import Config
from streamd.jetstream import DEFAULT_RETENTION_S, PartitionPublisher, Published, connect, ensure_ticks_stream
from streamd.logs import RateLimiter
from streamd.metrics import ClusterFeedMetrics, IngestMetrics
from streamd.partitions import partitions_for, split_by_partition
from streamd.protocol import DecodedTicks, encode_columnar_bin

BUFFER_BATCHES = 1000  # per partition: rides out an election at max_batch_size ticks a batch
PUBLISH_TIMEOUT_S = 30.0  # a batch is given up after this long (elections take seconds)
EWMA_HALF_LIVES = 20  # replay horizon of an ewma signal: older ticks weigh less than 1e-6
_CONNECT_TIMEOUT_S = 30.0
_ATTEMPT_TIMEOUT_S = 10.0
_T = TypeVar("_T")


async def retried(step: Callable[[], Awaitable[_T]], timeout: float = _CONNECT_TIMEOUT_S) -> _T:
    """Run a start-up step until it succeeds or ``timeout`` passes: a young cluster elects, answers slowly,
    and instances starting together race to create the same stream (one of them gets an error)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.wait_for(step(), min(_ATTEMPT_TIMEOUT_S, max(0.1, deadline - time.monotonic())))
        except Exception:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.25)


def replay_horizon_ns(config: Config) -> int:
    """How far back a takeover replays: the longest window, 20 half-lives of the slowest ewma, or the floor.

    Count windows have no time bound; ``cluster.replay_horizon`` (the floor) is what they rely on.
    """
    assert config.cluster is not None
    spans = [config.cluster.replay_horizon_ns]
    for spec in config.signals:
        if spec.window == "time":
            spans.append(spec.size)
        elif spec.window == "ewma":
            spans.append(EWMA_HALF_LIVES * spec.size)
    return max(spans)


def stream_retention_s(config: Config) -> float:
    """The ticks stream keeps at least twice the replay horizon (and an hour)."""
    return max(DEFAULT_RETENTION_S, 2 * replay_horizon_ns(config) / 1e9)


class ClusterFeed:
    """Per-partition buffers of one ingest, published to JetStream with bounded memory and time."""

    def __init__(self, config: Config, client_name: str, metrics: IngestMetrics, limited: RateLimiter) -> None:
        assert config.cluster is not None
        self.config = config
        self.cluster = config.cluster
        self.client_name = client_name
        self.metrics = metrics
        self.feed_metrics = ClusterFeedMetrics()
        self.limited = limited
        self.partition_of: dict[str | int, int] = {}  # the decoder's ``known`` keys in cluster mode
        partitions = self.cluster.partitions
        self._pending: list[list[tuple[Any, ...]]] = [[] for _ in range(partitions)]
        self._pending_ticks = [0] * partitions

    async def start(self) -> None:
        """Connect and make sure the ticks stream exists (bounded: an unreachable cluster is a start-up error)."""
        self.nc = await asyncio.wait_for(connect(list(self.cluster.servers), self.client_name), _CONNECT_TIMEOUT_S)
        js = self.nc.jetstream(timeout=5)
        await retried(lambda: ensure_ticks_stream(js, self.cluster.replicas, stream_retention_s(self.config)))
        self.publisher = PartitionPublisher(
            js,
            self.client_name,
            self.cluster.partitions,
            buffer_batches=BUFFER_BATCHES,
            publish_timeout=PUBLISH_TIMEOUT_S,
            on_outcome=self._on_outcome,
        )
        self.publisher.start()

    def accept(self, decoded: DecodedTicks) -> None:
        """Buffer a decoded flush by partition; partitions with nothing in flight publish at once."""
        keys = np.empty(len(decoded.keys), dtype=object)
        keys[:] = decoded.keys
        columns = split_by_partition(self._partitions(decoded), keys, decoded.t, decoded.p, decoded.q)
        limit = self.config.latency.max_batch_size
        for partition, part in columns.items():
            self._pending[partition].append(part)
            self._pending_ticks[partition] += len(part[1])
            if self.publisher.idle(partition) or self._pending_ticks[partition] >= limit:
                self._submit(partition)

    def _partitions(self, decoded: DecodedTicks) -> np.ndarray:
        """Each tick's partition: the decoder looked known keys up; new keys are hashed once, together."""
        codes = decoded.codes
        missing = np.flatnonzero(codes < 0)
        if not len(missing):
            return codes
        keys = [decoded.keys[i] for i in missing.tolist()]
        fresh = list(dict.fromkeys(keys))
        for key, partition in zip(fresh, partitions_for(fresh, self.cluster.partitions).tolist(), strict=True):
            self.partition_of[key] = partition
        codes = codes.copy()
        codes[missing] = [self.partition_of[key] for key in keys]
        return codes

    def _submit(self, partition: int) -> None:
        parts, ticks = self._pending[partition], self._pending_ticks[partition]
        self._pending[partition], self._pending_ticks[partition] = [], 0
        keys, t, p, q = (np.concatenate(column) if len(parts) > 1 else column[0] for column in zip(*parts, strict=True))
        if not self.publisher.submit(partition, encode_columnar_bin(keys, t, p, q), ticks):
            self.metrics.ticks_dropped.labels("cluster_overflow").inc(ticks)
            self.limited.warning("cluster_overflow", "partition buffer full, batch dropped", partition=partition)

    def _on_outcome(self, partition: int, ticks: int, result: Published | None) -> None:
        if result is None:
            self.metrics.ticks_dropped.labels("cluster_publish_failed").inc(ticks)
            self.limited.warning("cluster_publish_failed", "JetStream did not acknowledge a batch", partition=partition)
        else:
            metrics = self.feed_metrics
            metrics.published.inc(ticks)
            metrics.publish_latency.observe(result.seconds)
            if result.attempts > 1:
                metrics.stalls.inc()
                metrics.stalled.inc(result.seconds)
        if self._pending_ticks[partition]:
            self._submit(partition)

    async def close(self, timeout: float) -> None:
        """Publish what is buffered, waiting at most ``timeout``; what is left is counted as failed."""
        for partition, ticks in enumerate(self._pending_ticks):
            if ticks:
                self._submit(partition)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.publisher.flush(), timeout)
        left = self.publisher.buffered_ticks() + sum(self._pending_ticks)
        if left:
            self.metrics.ticks_dropped.labels("cluster_publish_failed").inc(left)
        await self.publisher.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.close(), 2)
