"""Supervisor: the main process. Starts one ingest per input endpoint and one worker per core,
replaces dead workers, forwards every worker's signals to the one public endpoint, serves
/metrics, talks to systemd.

Signal handlers only record what arrived; the main loop acts on it (``handle_term``,
``handle_hup``) and never sleeps or blocks on a child: replacing a dead worker is a small
state machine (ingests write off its queue, then the restart policy's backoff elapses, then
the replacement starts) advanced on each pass of the loop. Children are started with the
``spawn`` context and build their own sockets, logging and metrics from the picklable config.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait
from typing import Any

import zmq
from prometheus_client import start_http_server

from streamd import __version__
from streamd.children import ChildProcess, RestartPolicy
from streamd.cluster import cluster_main
from streamd.config import Config, ConfigError, load_config
from streamd.control import CheckpointNow, Control, Failed, Ready, Reload, Stop, WorkerLost, WorkerReset
from streamd.curve import secure_publish
from streamd.ingest import IngestStart, ingest_main
from streamd.ledger import TickLedger
from streamd.logs import apply_log_config, setup_logging
from streamd.metrics import ProcessInfo, SupervisorView, archive_dead_process, serving_registry
from streamd.proxy import SteerableProxy
from streamd.runtime import RuntimePaths, StartupError
from streamd.sdnotify import Notifier
from streamd.worker import worker_main

_TICK_S = 0.1
_STATUS_EVERY_S = 2.0
_STALL_S = 10.0
_READY_TIMEOUT_S = 30.0


@dataclass
class Replacement:
    """A dead worker's slot on its way back: waiting for every ingest's write-off, then for the backoff."""

    awaiting: set[int]
    start_at: float


@dataclass
class Progress:
    """When each worker last applied something, for stall detection."""

    applied: list[int]
    since: list[float] = field(default_factory=list)


class Forwarder:
    """XSUB (workers connect) -> XPUB (users subscribe) proxy running in a C-level thread."""

    def __init__(self, ctx: zmq.Context[Any], inside: str, outside: str, sndhwm: int, config: Config) -> None:
        self._ctx = ctx
        self.xsub = ctx.socket(zmq.XSUB)
        self.xpub = ctx.socket(zmq.XPUB)
        self.curve = secure_publish(ctx, self.xpub, config, logging.getLogger("supervisor"))
        self.xpub.setsockopt(zmq.SNDHWM, sndhwm)
        self.xsub.setsockopt(zmq.RCVHWM, sndhwm)
        for sock in (self.xsub, self.xpub):
            sock.setsockopt(zmq.LINGER, 0)
        try:
            self.xpub.bind(outside)
        except zmq.ZMQError as exc:
            self.close_sockets()
            msg = f"publish.endpoint: cannot bind {outside}: {zmq.strerror(exc.errno or 0)}"
            raise StartupError(msg) from None
        self.xsub.bind(inside)
        self._proxy = SteerableProxy(ctx, self.xsub, self.xpub, "forwarder")

    def start(self) -> None:
        self._proxy.start()

    def stop(self) -> None:
        self._proxy.stop()
        self.close_sockets()

    def close_sockets(self) -> None:
        if self.curve is not None:
            self.curve.stop()
        self.xsub.close(0)
        self.xpub.close(0)


class Supervisor:
    """startup() -> main_loop() -> shutdown(); ``run()`` returns the process exit code."""

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.log = setup_logging(config.log, "supervisor")
        self.notifier = Notifier(unset_environment=True)
        self.mp = multiprocessing.get_context("spawn")
        self.n_ingests = len(config.ingest.endpoints)
        self.n_workers = config.workers.resolved_count()
        self.n_sources = self.n_ingests + (config.cluster is not None)  # the cluster process feeds workers too
        self.ledger = TickLedger(self.n_sources, self.n_workers, self.mp)
        self.ingests: list[ChildProcess] = []
        self.cluster: ChildProcess | None = None
        self.cluster_generation = 0
        self.workers: list[ChildProcess] = []
        self.generations = [0] * self.n_workers
        self.ingest_generations = [0] * self.n_ingests
        self.policies = [RestartPolicy() for _ in range(self.n_workers)]
        self.replacing: dict[int, Replacement] = {}
        self.restarts = {str(i): 0 for i in range(self.n_workers)}
        self.ingest_restarts = {str(i): 0 for i in range(self.n_ingests)}
        self.reloads = {"success": 0, "failure": 0}
        self.pending_signals: list[int] = []
        self.metrics_lock = threading.Lock()  # scrapes vs folding a dead child's metric files
        self.exit_code = 0

    # signal handlers only record ---------------------------------------------------------
    def _record_signal(self, signum: int, _frame: Any) -> None:
        self.pending_signals.append(signum)

    def _install_handlers(self) -> dict[int, Any]:
        return {sig: signal.signal(sig, self._record_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    # start-up -------------------------------------------------------------------------
    def startup(self) -> None:
        self.paths = RuntimePaths.create()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.paths.metrics_dir
        self.ctx = zmq.Context()
        self.forwarder = Forwarder(
            self.ctx,
            self.paths.forwarder_endpoint,
            self.config.publish.endpoint,
            self.config.publish.sndhwm,
            self.config,
        )
        try:
            self._serve_metrics()
        except StartupError:
            self.forwarder.close_sockets()
            raise
        self.forwarder.start()
        self.ingests = [self._start_ingest(i) for i in range(self.n_ingests)]
        if self.config.cluster is not None:
            self.cluster = self._start_cluster()
        self.workers = [self._start_worker(w) for w in range(self.n_workers)]
        self._await_ready()
        self.notifier.ready()
        self.log.info(
            "streamd ready",
            extra={
                "version": __version__,
                "workers": self.n_workers,
                "ingests": self.n_ingests,
                "ingest": ",".join(self.config.ingest.endpoints),
                "publish": self.config.publish.endpoint,
                "metrics": self.config.metrics.listen,
                "config": self.config.source,
            },
        )

    def _serve_metrics(self) -> None:
        view = SupervisorView(
            processes=self._process_infos,
            worker_up=lambda: {str(w): self._worker_up(w) for w in range(self.n_workers)},
            restarts=lambda: dict(self.restarts),
            ingest_restarts=lambda: dict(self.ingest_restarts),
            backlog=lambda: {str(w): self.ledger.backlog(w) for w in range(self.n_workers)},
            reloads=lambda: dict(self.reloads),
            version=__version__,
            config_hash=self._config_digest,
        )
        host, port = self.config.metrics.host_port()
        own = [] if self.forwarder.curve is None else [self.forwarder.curve.metrics.failures]
        self.registry = serving_registry(self.paths.metrics_dir, view, self.metrics_lock, *own)
        try:
            self.http_server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            msg = f"metrics.listen: cannot listen on {self.config.metrics.listen}: {exc.strerror or exc}"
            raise StartupError(msg) from None

    def _config_digest(self) -> str:
        return self.config.digest()

    def _process_infos(self) -> list[ProcessInfo]:
        """Called from the metrics thread: works on snapshots of the child lists."""
        infos = [ProcessInfo("supervisor", "", os.getpid())]
        for child in self._children():
            pid = child.pid
            if pid is not None and child.exitcode is None:
                infos.append(ProcessInfo(child.role, child.label, pid))
        return infos

    def _start_ingest(self, index: int, write_off: tuple[int, ...] = ()) -> ChildProcess:
        start = IngestStart(index, self.ingest_generations[index], tuple(self.generations), write_off)
        child = ChildProcess(self.mp, "ingest", index, ingest_main, (start, self.config, self.paths, self.ledger))
        child.start()
        return child

    def _start_cluster(self, write_off: tuple[int, ...] = ()) -> ChildProcess:
        """The cluster process feeds the workers as one more ingest, numbered after the real ones."""
        start = IngestStart(self.n_ingests, self.cluster_generation, tuple(self.generations), write_off)
        args = (start, self.config, self.paths, self.ledger)
        child = ChildProcess(self.mp, "cluster", self.n_ingests, cluster_main, args)
        child.start()
        return child

    def _start_worker(self, index: int) -> ChildProcess:
        args = (index, self.generations[index], self.config, self.paths, self.ledger)
        child = ChildProcess(self.mp, "worker", index, worker_main, args)
        child.start()
        self.policies[index].started()
        return child

    def _children(self) -> list[ChildProcess]:
        return [*self.ingests, *([self.cluster] if self.cluster is not None else []), *self.workers]

    def _await_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not all(c.ready for c in self._children()):
            if time.monotonic() > deadline:
                msg = "children did not report ready within 30 s"
                raise StartupError(msg)
            self._poll_children(timeout=_TICK_S, starting=True)

    def _worker_up(self, index: int) -> bool:
        child = self.workers[index]
        return child.ready and child.exitcode is None and index not in self.replacing

    # main loop ------------------------------------------------------------------------
    def main_loop(self) -> None:
        last_status = time.monotonic()
        last_watchdog = 0.0
        watchdog_every = self.notifier.watchdog_interval()
        progress = Progress([0] * self.n_workers, [time.monotonic()] * self.n_workers)
        seen = [0] * self.n_workers
        while True:
            while self.pending_signals:
                signum = self.pending_signals.pop(0)
                if signum == signal.SIGHUP:
                    self.handle_hup()
                else:
                    self.log.info("stopping", extra={"signal": signal.Signals(signum).name})
                    return
            self._poll_children(timeout=_TICK_S)
            self._replace_dead_ingests()
            self._replace_dead_workers()
            now = time.monotonic()
            self._kill_stalled_workers(progress, now)
            if watchdog_every and now - last_watchdog >= watchdog_every:
                self.notifier.watchdog()
                last_watchdog = now
            if now - last_status >= _STATUS_EVERY_S:
                seen = self._report_status(seen, now - last_status)
                last_status = now

    def _poll_children(self, timeout: float, starting: bool = False) -> None:
        by_conn = {c.conn: c for c in self._children() if not c.conn.closed}
        for ready in wait(list(by_conn), timeout=timeout):
            child = by_conn[ready]  # type: ignore[index]
            message = child.receive()
            if message is None:
                if starting and not child.ready:
                    child.join(1)
                    msg = f"{child.name} exited during start-up (exit code {child.exitcode})"
                    raise StartupError(msg) from None
                continue
            self._on_child_message(child, message, starting)

    def _on_child_message(self, child: ChildProcess, message: Control, starting: bool) -> None:
        if isinstance(message, Ready):
            child.ready = True
        elif isinstance(message, Failed) and starting:
            raise StartupError(message.error)
        elif isinstance(message, Failed):
            self.log.error("child failed", extra={"role": child.role, "index": child.index, "error": message.error})
        elif isinstance(message, WorkerReset) and message.worker in self.replacing:
            self.replacing[message.worker].awaiting.discard(child.index)

    # replacing dead workers, without ever blocking the loop ------------------------------
    def _replace_dead_workers(self) -> None:
        for index, child in enumerate(self.workers):
            if index not in self.replacing and child.exitcode is not None:
                self._begin_replacement(index, child)
        now = time.monotonic()
        for index, replacement in list(self.replacing.items()):
            if not replacement.awaiting and now >= replacement.start_at:
                del self.replacing[index]
                self.workers[index] = self._start_worker(index)

    def _replace_dead_ingests(self) -> None:
        """A dead ingest is replaced at once in its slot: it holds no window state, only buffers.

        The replacement counts what its predecessor held as ``ingest_lost`` and writes off, for
        it, any worker that died meanwhile (the dead ingest could not answer ``WorkerLost``).
        """
        for index, child in enumerate(self.ingests):
            if child.exitcode is None:
                continue
            if child.pid is not None:
                archive_dead_process(child.pid, self.paths.metrics_dir, self.metrics_lock)
            child.conn.close()
            self.ingest_restarts[str(index)] += 1
            self.ingest_generations[index] += 1
            self.log.error(
                "ingest died, restarting",
                extra={"ingest": index, "exitcode": child.exitcode, "restarts": self.ingest_restarts[str(index)]},
            )
            orphaned = tuple(w for w, r in self.replacing.items() if index in r.awaiting)
            self.ingests[index] = self._start_ingest(index, orphaned)
            self._checkpoint_workers_now()
        self._replace_dead_cluster()

    def _replace_dead_cluster(self) -> None:
        """A dead cluster process is replaced at once; its leases expire and are taken again by replay."""
        child = self.cluster
        if child is None or child.exitcode is None:
            return
        if child.pid is not None:
            archive_dead_process(child.pid, self.paths.metrics_dir, self.metrics_lock)
        child.conn.close()
        self.cluster_generation += 1
        self.log.error("cluster process died, restarting", extra={"exitcode": child.exitcode})
        orphaned = tuple(w for w, r in self.replacing.items() if self.n_ingests in r.awaiting)
        self.cluster = self._start_cluster(orphaned)
        self._checkpoint_workers_now()

    def _checkpoint_workers_now(self) -> None:
        """A dead ingest's journal died with it: until each worker's next checkpoint, a worker death
        would lose what that ingest had handed it, so the window is closed at once."""
        if self.config.state.dir is None:
            return
        for index, child in enumerate(self.workers):
            if index not in self.replacing:
                child.send(CheckpointNow())

    def _begin_replacement(self, index: int, child: ChildProcess) -> None:
        """Ask every ingest to write off the dead worker's queue; the replacement waits for all of them."""
        if child.pid is not None:
            archive_dead_process(child.pid, self.paths.metrics_dir, self.metrics_lock)
        child.conn.close()
        self.restarts[str(index)] += 1
        self.generations[index] += 1
        self.log.error(
            "worker died, restarting",
            extra={"worker": index, "exitcode": child.exitcode, "restarts": self.restarts[str(index)]},
        )
        for ingest in self._sources():
            ingest.send(WorkerLost(index, self.generations[index]))
        self.replacing[index] = Replacement(set(range(self.n_sources)), self.policies[index].died())

    def _sources(self) -> list[ChildProcess]:
        """Every process that feeds the workers: the ingests and, in a cluster, the cluster process."""
        return [*self.ingests, *([self.cluster] if self.cluster is not None else [])]

    def _kill_stalled_workers(self, progress: Progress, now: float) -> None:
        """A worker that holds a backlog and applies nothing for _STALL_S is killed, and so replaced."""
        for index, child in enumerate(self.workers):
            applied = self.ledger.applied_total(index)
            if applied != progress.applied[index] or not self.ledger.backlog(index) or index in self.replacing:
                progress.applied[index], progress.since[index] = applied, now
            elif now - progress.since[index] > _STALL_S:
                self.log.error(
                    "worker stalled: backlog not moving; killing it",
                    extra={
                        "worker": index,
                        "stalled_s": round(now - progress.since[index], 1),
                        "backlog": self.ledger.backlog(index),
                    },
                )
                child.kill()
                progress.since[index] = now

    def _report_status(self, seen: list[int], elapsed: float) -> list[int]:
        applied = [self.ledger.applied_total(w) for w in range(self.n_workers)]
        rate = sum(a - s for a, s in zip(applied, seen, strict=True)) / elapsed if elapsed > 0 else 0.0
        up = sum(self._worker_up(w) for w in range(self.n_workers))
        backlog = sum(self.ledger.backlog(w) for w in range(self.n_workers))
        self.notifier.status(
            f"{rate:,.0f} ticks/s processed, backlog {backlog} ticks, {up}/{self.n_workers} workers up"
        )
        return applied

    # reload ---------------------------------------------------------------------------
    def handle_hup(self) -> None:
        """Re-read the config; apply signals, batching and logging everywhere; keep the old one if it is bad."""
        if self.config_path is None:
            self.log.warning("SIGHUP ignored: running on the built-in config")
            return
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            self.reloads["failure"] += 1
            self.log.error("config reload rejected, keeping the running config", extra={"error": str(exc)})
            self.notifier.ready()
            return
        fixed = {
            "ingest": new.ingest,
            "publish": new.publish,
            "metrics": new.metrics,
            "workers": new.workers,
            "security": new.security,
            "cluster": new.cluster,
        }
        changed = [name for name, value in fixed.items() if getattr(self.config, name) != value]
        running = self.config.state
        store = replace(new.state, dir=running.dir, snapshot_interval_ns=running.snapshot_interval_ns)
        store = replace(store, journal_bytes=running.journal_bytes)
        if store != new.state:
            changed.append("state.dir/snapshot_interval/journal_bytes")
        if changed:
            self.log.warning(
                "these sections need a restart to change; kept as running", extra={"sections": ",".join(changed)}
            )
        self.config = replace(
            new,
            ingest=self.config.ingest,
            publish=self.config.publish,
            metrics=self.config.metrics,
            workers=self.config.workers,
            security=self.config.security,
            state=store,
            cluster=self.config.cluster,
        )
        apply_log_config(self.config.log)
        if self.forwarder.curve is not None:
            self.forwarder.curve.reload()
        for child in self._children():
            child.send(Reload(self.config))
        self.reloads["success"] += 1
        self.log.info(
            "config reloaded", extra={"config_hash": self.config.digest(), "signals": len(self.config.signals)}
        )
        self.notifier.ready()

    # shutdown -------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop intake, let in-flight batches finish, and stop within ``shutdown.graceful_timeout``."""
        self.notifier.stopping()
        deadline = time.monotonic() + self.config.shutdown.graceful_timeout_ns / 1e9
        for ingest in self._sources():
            ingest.send(Stop())
        for child in self._children():
            child.join(deadline - time.monotonic())
        stragglers = [c for c in self._children() if c.is_alive()]
        for child in stragglers:
            self.log.warning("did not stop in time, killing", extra={"role": child.role, "index": child.index})
            child.kill()
        if stragglers:
            self.exit_code = self.exit_code or 1
        self.forwarder.stop()
        self.http_server.shutdown()
        self.ctx.term()
        books = self._books()
        self.paths.remove()
        self.log.info("streamd stopped", extra={"exit_code": self.exit_code, **books})

    def _books(self) -> dict[str, int]:
        """Final tick accounting of this run, for the last log line: received, processed, dropped."""
        totals = {"received": 0.0, "processed": 0.0, "dropped": 0.0}
        names = {
            "streamd_ticks_received_total": "received",
            "streamd_ticks_processed_total": "processed",
            "streamd_ticks_dropped_total": "dropped",
        }
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name in names:
                    totals[names[sample.name]] += sample.value
        return {name: int(value) for name, value in totals.items()}

    def abort(self) -> None:
        """Tear down after a failed start-up."""
        for child in self._children():
            child.kill()
        if hasattr(self, "http_server"):
            self.http_server.shutdown()
        if hasattr(self, "forwarder"):
            self.forwarder.stop()
        if hasattr(self, "ctx"):
            self.ctx.destroy(0)
        if hasattr(self, "paths"):
            self.paths.remove()

    def run(self) -> int:
        previous = self._install_handlers()
        try:
            try:
                self.startup()
            except StartupError:
                self.abort()
                raise
            self.main_loop()
            self.shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.exit_code
