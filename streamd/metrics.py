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
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
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
# Finer where a worker's drains usually fall: the queueing model of a flood's cost to live keys
# (bench/keyflood.py) reads their distribution from these.
APPLY_BUCKETS = (
    100e-6,
    250e-6,
    500e-6,
    750e-6,
    1e-3,
    1.5e-3,
    2e-3,
    3e-3,
    4e-3,
    5e-3,
    7.5e-3,
    10e-3,
    15e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    1.0,
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
        self.keys = Gauge(
            "streamd_ingest_keys",
            "Keys this ingest routes (its share of state.max_keys): seen within state.key_ttl.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.new_key_backlog = Gauge(
            "streamd_ingest_new_key_backlog_ticks",
            "Ticks of new keys waiting for their worker to have room (the fresh lane), after each dispatch.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.keys_released = Counter(
            "streamd_ingest_keys_released_total",
            "Keys an ingest stopped routing after state.key_ttl of silence (their slots announced gone).",
            registry=registry,
        )
        self.overloaded = Counter(
            "streamd_ingest_overload_total",
            "Times ingest.max_queue_bytes was reached: input paused (pull mode) or shed (sub mode).",
            registry=registry,
        )
        self.journal_evicted = Counter(
            "streamd_journal_evicted_ticks_total",
            "Ticks evicted from a replay journal (state.journal_bytes) before a checkpoint held them: "
            "not replayable if their worker dies before its next checkpoint.",
            registry=registry,
        )
        self.replayed = Counter(
            "streamd_journal_replayed_ticks_total",
            "Ticks replayed from the journal to a replaced worker.",
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
            "streamd_signals_published_total",
            "Signal rows published (one per key), including rows no subscriber wanted, which are not sent.",
            ["signal"],
            registry=registry,
        )
        self.publish_dropped = Counter(
            "streamd_publish_dropped_total",
            "Signal rows dropped because the queue to the publish endpoint was full (publish.sndhwm).",
            ["signal"],
            registry=registry,
        )
        self.publish_messages = Counter(
            "streamd_publish_messages_total",
            "ZeroMQ messages sent towards the publish endpoint (none for rows no subscriber wants).",
            ["signal"],
            registry=registry,
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
        apply_seconds = Histogram(
            "streamd_worker_apply_seconds",
            "Time a worker took to apply one drain of batches (map keys, update windows, publish), by whether "
            "it announced or released keys (new_or_gone) or not (known). A batch arriving meanwhile waits for it.",
            ["keys"],
            buckets=APPLY_BUCKETS,
            registry=registry,
        )
        self.apply_known = apply_seconds.labels("known")
        self.apply_new_or_gone = apply_seconds.labels("new_or_gone")
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
        self.keys_evicted = Counter(
            "streamd_keys_evicted_total",
            "Keys whose state a worker dropped: no ingest routes them any more (state.key_ttl).",
            ["worker"],
            registry=registry,
        ).labels(label)
        self.state_bytes = Gauge(
            "streamd_worker_state_bytes",
            "Bytes of window state held.",
            ["worker"],
            multiprocess_mode="livesum",
            registry=registry,
        ).labels(label)
        self.checkpoints = Counter(
            "streamd_checkpoints_total", "Checkpoints written, by result.", ["result"], registry=registry
        )
        self.checkpoint_seconds = Histogram(
            "streamd_checkpoint_seconds",
            "Encoding and writing one checkpoint (background thread), fsync included.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.checkpoint_pause = Histogram(
            "streamd_checkpoint_pause_seconds",
            "What a checkpoint costs the worker's loop: copying the state.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.replayed_quietly = Counter(
            "streamd_worker_replayed_ticks_total",
            "Replayed ticks a dead predecessor had already applied: applied again, not counted or published.",
            ["worker"],
            registry=registry,
        ).labels(label)


class AuthMetrics:
    """CURVE handshakes refused on a public socket, written by the process that owns it.

    ``endpoint`` is the kind of socket, ``ingest`` or ``publish``: never the peer or its key,
    which go to the (rate-limited) log instead.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.failures = Counter(
            "streamd_auth_failures_total",
            "CURVE handshakes that failed: a client key not authorized, a client without CURVE or with the "
            "wrong server key, or (sub mode) the feed refusing streamd's key.",
            ["endpoint"],
            registry=registry,
        )


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
        self.reader_failures = Counter(
            "streamd_cluster_reader_failures_total",
            "Partition readers that failed with an unexpected error and were started again (with a replay).",
            registry=registry,
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


class _MergedCollector(Collector):
    """The children's multiprocess files plus the supervisor's own metrics, one family per name.

    The supervisor imported prometheus-client before it chose the multiprocess directory, so
    its own counters live in its memory, not in those files. A metric that both write (such as
    ``streamd_auth_failures_total``: ingest and publish) must still be one family: a second
    ``# TYPE`` line for a name makes Prometheus reject the whole scrape. The files are read under
    the lock that :func:`archive_dead_process` holds.
    """

    def __init__(self, multiproc_dir: str, lock: threading.Lock, own: tuple[Collector, ...]) -> None:
        self._files = MultiProcessCollector(None, path=multiproc_dir)  # type: ignore[no-untyped-call]
        self._lock = lock
        self._own = own

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            parts = [list(self._files.collect())]  # type: ignore[no-untyped-call]
        parts += [list(collector.collect()) for collector in self._own]
        families: dict[str, Metric] = {}
        for part in parts:
            for family in part:
                if family.name in families:
                    kept = [s for s in family.samples if not s.name.endswith("_created")]
                    families[family.name].samples.extend(kept)
                else:
                    families[family.name] = family
        yield from families.values()


def serving_registry(
    multiproc_dir: str, view: SupervisorView, lock: threading.Lock, *own: Collector
) -> CollectorRegistry:
    """The registry behind /metrics: every child's mmap files, the supervisor's view and its ``own`` metrics."""
    registry = CollectorRegistry()
    registry.register(_MergedCollector(multiproc_dir, lock, own))
    registry.register(SupervisorCollector(view))
    return registry


def archive_dead_process(pid: int, multiproc_dir: str, lock: threading.Lock) -> None:
    """Fold a dead child's counters and histograms into one archive file per type, and delete its files.

    A killed worker's counts must stay in the totals (the accounting identity), but one set of
    files per dead process would pile up forever under a crash loop. Adding its samples into
    ``counter_archive.db`` / ``histogram_archive.db`` and removing its own files keeps both; the
    lock keeps a scrape from seeing the samples twice or not at all in between.
    """
    with lock:
        for kind in ("counter", "histogram"):
            source = os.path.join(multiproc_dir, f"{kind}_{pid}.db")
            if not os.path.exists(source):
                continue
            archive = MmapedDict(os.path.join(multiproc_dir, f"{kind}_archive.db"))  # type: ignore[no-untyped-call]
            try:
                for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(source):  # type: ignore[no-untyped-call]
                    total, _ = archive.read_value(key)  # type: ignore[no-untyped-call]
                    archive.write_value(key, total + value, timestamp)  # type: ignore[no-untyped-call]
            finally:
                archive.close()  # type: ignore[no-untyped-call]
            os.remove(source)
        mark_process_dead(pid, multiproc_dir)  # type: ignore[no-untyped-call]
