"""Every streamd metric, declared in one place under the ``streamd_`` namespace.

Ingest and worker processes write their samples through prometheus-client's multiprocess
mode (one mmap file per process in ``PROMETHEUS_MULTIPROC_DIR``), so counters of a worker
that was killed keep counting in the totals and the accounting identity
``received == processed + sum(dropped)`` survives crashes. The supervisor serves the one
``/metrics`` endpoint, merging those files with what only it knows (worker liveness,
restarts, per-process CPU and memory, backlog, build info) through :class:`SupervisorCollector`.
No metric carries a per-key label.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    500e-3,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000)


class IngestMetrics:
    """Samples written by the ingest process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.ticks_received = Counter(
            "streamd_ticks_received_total", "Ticks decoded from well-formed input payloads.", registry=registry
        )
        self.ticks_dropped = Counter(
            "streamd_ticks_dropped_total", "Ticks dropped, by reason.", ["reason"], registry=registry
        )
        self.messages_received = Counter(
            "streamd_ingest_messages_total", "ZeroMQ messages received on the input sockets.", registry=registry
        )
        self.messages_dropped = Counter(
            "streamd_ingest_messages_dropped_total",
            "Whole input payloads dropped (not msgpack, or not a protocol shape), by reason.",
            ["reason"],
            registry=registry,
        )
        self.bytes_received = Counter(
            "streamd_ingest_bytes_total", "Payload bytes received on the input sockets.", registry=registry
        )
        self.batch_size = Histogram(
            "streamd_batch_size_ticks", "Ticks per batch handed to a worker.", buckets=BATCH_BUCKETS, registry=registry
        )
        self.batches_sent = Counter(
            "streamd_ingest_batches_total", "Batches handed to workers.", ["worker"], registry=registry
        )
        self.overloaded = Counter(
            "streamd_ingest_overload_total",
            "Times ingest.max_queue_bytes was reached: input paused (pull mode) or shed (sub mode).",
            registry=registry,
        )


class WorkerMetrics:
    """Samples written by one analytics worker process."""

    def __init__(self, worker: int, registry: CollectorRegistry | None = None) -> None:
        label = str(worker)
        self.ticks_processed = Counter(
            "streamd_ticks_processed_total", "Ticks applied to windows.", ["worker"], registry=registry
        ).labels(label)
        self.ticks_dropped = Counter(
            "streamd_ticks_dropped_total", "Ticks dropped, by reason.", ["reason"], registry=registry
        )
        self.signals_published = Counter(
            "streamd_signals_published_total", "Signal rows published (one per key).", ["signal"], registry=registry
        )
        self.publish_messages = Counter(
            "streamd_publish_messages_total", "ZeroMQ messages published.", ["signal"], registry=registry
        )
        self.latency = Histogram(
            "streamd_latency_seconds",
            "Ingest receive to signal publish, per batch (oldest tick in the batch).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.event_lag = Histogram(
            "streamd_event_lag_seconds",
            "Publish wall clock minus the newest event time in the batch.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.stale_batches = Counter(
            "streamd_worker_stale_batches_total",
            "Batches meant for a dead predecessor of this worker, discarded (their ticks count as worker_lost).",
            ["worker"],
            registry=registry,
        ).labels(label)
        self.busy = Counter(
            "streamd_worker_busy_seconds_total", "Time spent processing batches.", ["worker"], registry=registry
        ).labels(label)
        self.batches = Counter(
            "streamd_worker_batches_total", "Batches processed.", ["worker"], registry=registry
        ).labels(label)
        self.keys = Gauge(
            "streamd_worker_keys",
            "Keys held in window state.",
            ["worker"],
            multiprocess_mode="livesum",
            registry=registry,
        ).labels(label)
        self.state_bytes = Gauge(
            "streamd_worker_state_bytes",
            "Bytes of window state held.",
            ["worker"],
            multiprocess_mode="livesum",
            registry=registry,
        ).labels(label)


class ClusterFeedMetrics:
    """Samples written by an ingest in cluster mode: what it published to JetStream, and how fast."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.published = Counter(
            "streamd_ticks_published_to_cluster_total",
            "Ticks this instance's ingest published to JetStream (acknowledged).",
            registry=registry,
        )
        self.publish_latency = Histogram(
            "streamd_cluster_publish_seconds",
            "JetStream publish of one partition batch, first attempt to acknowledgement.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.stalls = Counter(
            "streamd_cluster_publish_stalls_total",
            "Partition batches that needed more than one publish attempt (e.g. a stream leader election).",
            registry=registry,
        )
        self.stalled = Counter(
            "streamd_cluster_publish_stalled_seconds_total",
            "Time those stalled batches took to be acknowledged.",
            registry=registry,
        )


class ClusterMetrics:
    """Samples written by the cluster process: ownership, reading and replay."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.owned = Gauge(
            "streamd_cluster_partitions_owned",
            "Partitions this instance holds a lease on.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.replaying = Gauge(
            "streamd_cluster_partitions_replaying",
            "Owned partitions still replaying (windows being rebuilt, nothing published yet).",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.lease_changes = Counter(
            "streamd_cluster_lease_changes_total",
            "Lease events of this instance: acquired, released, lost.",
            ["kind"],
            registry=registry,
        )
        self.read = Counter(
            "streamd_cluster_ticks_read_total",
            "Ticks read from JetStream and handed to the workers, by phase (replay or live).",
            ["phase"],
            registry=registry,
        )
        self.replay_seconds = Histogram(
            "streamd_cluster_replay_seconds",
            "Takeover: from acquiring a partition's lease to publishing it (replay done).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.reader_stalls = Counter(
            "streamd_cluster_reader_stalls_total",
            "Times a partition reader heard nothing for two heartbeats and recreated its consumer.",
            registry=registry,
        )
        self.reader_stalled = Counter(
            "streamd_cluster_reader_stalled_seconds_total", "Silence before those recreations.", registry=registry
        )


@dataclass
class ProcessInfo:
    role: str
    worker: str
    pid: int


def _read_proc(pid: int) -> tuple[float, int, int] | None:
    """CPU seconds, resident bytes and open fds of ``pid`` from /proc (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            fields = stat_file.read().rsplit(b")", 1)[1].split()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss, fds


@dataclass
class SupervisorView:
    """What the supervisor knows at scrape time, as callables so the collector stays stateless."""

    processes: Callable[[], list[ProcessInfo]]
    worker_up: Callable[[], dict[str, bool]]
    restarts: Callable[[], dict[str, int]]
    ingest_restarts: Callable[[], dict[str, int]]
    backlog: Callable[[], dict[str, int]]
    reloads: Callable[[], dict[str, int]]
    version: str
    config_hash: Callable[[], str]


class SupervisorCollector(Collector):
    """Metrics only the supervisor knows, computed at scrape time."""

    def __init__(self, view: SupervisorView) -> None:
        self._view = view

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | InfoMetricFamily]:
        view = self._view
        up = GaugeMetricFamily("streamd_worker_up", "1 while the worker process is alive.", labels=["worker"])
        for worker, alive in sorted(view.worker_up().items()):
            up.add_metric([worker], 1.0 if alive else 0.0)
        yield up
        restarts = CounterMetricFamily("streamd_worker_restarts", "Worker processes restarted.", labels=["worker"])
        for worker, count in sorted(view.restarts().items()):
            restarts.add_metric([worker], count)
        yield restarts
        ingest_restarts = CounterMetricFamily(
            "streamd_ingest_restarts", "Ingest processes restarted (one per input endpoint).", labels=["ingest"]
        )
        for ingest, count in sorted(view.ingest_restarts().items()):
            ingest_restarts.add_metric([ingest], count)
        yield ingest_restarts
        backlog = GaugeMetricFamily(
            "streamd_worker_backlog_ticks", "Ticks handed to a worker and not yet processed.", labels=["worker"]
        )
        for worker, ticks in sorted(view.backlog().items()):
            backlog.add_metric([worker], ticks)
        yield backlog
        reloads = CounterMetricFamily("streamd_config_reloads", "SIGHUP config reloads, by result.", labels=["result"])
        for result, count in sorted(view.reloads().items()):
            reloads.add_metric([result], count)
        yield reloads
        yield from self._process_families(view.processes())
        info = InfoMetricFamily("streamd_build", "streamd version and effective config hash.")
        info.add_metric([], {"version": view.version, "config_hash": view.config_hash()})
        yield info

    @staticmethod
    def _process_families(processes: list[ProcessInfo]) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        labels = ["role", "worker"]
        cpu = CounterMetricFamily("streamd_process_cpu_seconds", "User and system CPU time.", labels=labels)
        rss = GaugeMetricFamily("streamd_process_resident_memory_bytes", "Resident memory.", labels=labels)
        fds = GaugeMetricFamily("streamd_process_open_fds", "Open file descriptors.", labels=labels)
        for process in processes:
            sample = _read_proc(process.pid)
            if sample is None:
                continue
            cpu_s, rss_b, fd_n = sample
            cpu.add_metric([process.role, process.worker], cpu_s)
            rss.add_metric([process.role, process.worker], rss_b)
            fds.add_metric([process.role, process.worker], fd_n)
        yield cpu
        yield rss
        yield fds


def serving_registry(multiproc_dir: str, view: SupervisorView) -> CollectorRegistry:
    """The registry behind /metrics: every child's mmap files plus the supervisor's view."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=multiproc_dir)  # type: ignore[no-untyped-call]
    registry.register(SupervisorCollector(view))
    return registry
