"""Supervisor: the main process. Starts the ingest and the workers, restarts dead workers,
forwards every worker's signals to the one public endpoint, serves /metrics, talks to systemd.

Signal handlers only record what arrived; the main loop acts on it (``handle_term``,
``handle_hup``). Children are started with the ``spawn`` context and build their own
sockets, logging and metrics from the picklable config.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import Any

import zmq
from prometheus_client import start_http_server
from prometheus_client.multiprocess import mark_process_dead

from streamd import __version__
from streamd.config import Config, ConfigError, load_config
from streamd.ingest import ingest_main
from streamd.logs import setup_logging
from streamd.metrics import ProcessInfo, SupervisorView, serving_registry
from streamd.runtime import RuntimePaths, StartupError
from streamd.sdnotify import Notifier
from streamd.worker import worker_main

_TICK_S = 0.1
_STATUS_EVERY_S = 2.0
_STALL_S = 10.0
_READY_TIMEOUT_S = 30.0
_MAX_BACKOFF_S = 5.0


@dataclass
class Child:
    """One child process slot; a dead worker is replaced in the same slot."""

    role: str
    index: int
    process: Any
    conn: Connection
    ready: bool = False

    @property
    def label(self) -> str:
        return "" if self.role == "ingest" else str(self.index)


class Forwarder:
    """XSUB (workers connect) -> XPUB (users subscribe) proxy running in a C-level thread."""

    def __init__(self, ctx: zmq.Context[Any], inside: str, outside: str, sndhwm: int) -> None:
        self._ctx = ctx
        self.xsub = ctx.socket(zmq.XSUB)
        self.xpub = ctx.socket(zmq.XPUB)
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
        self._control = ctx.socket(zmq.PAIR)
        self._control.bind(f"inproc://forwarder-control-{id(self)}")
        self._steer = ctx.socket(zmq.PAIR)
        self._steer.connect(f"inproc://forwarder-control-{id(self)}")
        self._thread = threading.Thread(target=self._run, name="forwarder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(zmq.ContextTerminated):
            zmq.proxy_steerable(self.xsub, self.xpub, None, self._control)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._steer.send(b"TERMINATE")
            self._thread.join(timeout=5)
        self.close_sockets()
        self._control.close(0)
        self._steer.close(0)

    def close_sockets(self) -> None:
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
        self.n_workers = config.workers.resolved_count()
        self.sent = self.mp.Array("q", self.n_workers, lock=False)
        self.done = self.mp.Array("q", self.n_workers, lock=False)
        self.children: dict[tuple[str, int], Child] = {}
        self.restarts = {str(i): 0 for i in range(self.n_workers)}
        self.reloads = {"success": 0, "failure": 0}
        self.backoff = {i: 0.1 for i in range(self.n_workers)}
        self.pending_signals: list[int] = []
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
            self.ctx, self.paths.forwarder_endpoint, self.config.publish.endpoint, self.config.publish.sndhwm
        )
        try:
            self._serve_metrics()
        except StartupError:
            self.forwarder.close_sockets()
            raise
        self.forwarder.start()
        self._start_child("ingest", 0)
        for index in range(self.n_workers):
            self._start_child("worker", index)
        self._await_ready()
        self.notifier.ready()
        self.log.info(
            "streamd ready",
            extra={
                "version": __version__,
                "workers": self.n_workers,
                "ingest": ",".join(self.config.ingest.endpoints),
                "publish": self.config.publish.endpoint,
                "metrics": self.config.metrics.listen,
                "config": self.config.source,
            },
        )

    def _serve_metrics(self) -> None:
        view = SupervisorView(
            processes=self._process_infos,
            worker_up=lambda: {str(i): self._alive("worker", i) for i in range(self.n_workers)},
            restarts=lambda: dict(self.restarts),
            backlog=lambda: {str(i): max(0, self.sent[i] - self.done[i]) for i in range(self.n_workers)},
            reloads=lambda: dict(self.reloads),
            version=__version__,
            config_hash=self._config_digest,
        )
        host, port = self.config.metrics.host_port()
        try:
            self.http_server, _ = start_http_server(
                port, addr=host, registry=serving_registry(self.paths.metrics_dir, view)
            )
        except OSError as exc:
            msg = f"metrics.listen: cannot listen on {self.config.metrics.listen}: {exc.strerror or exc}"
            raise StartupError(msg) from None

    def _config_digest(self) -> str:
        return self.config.digest()

    def _process_infos(self) -> list[ProcessInfo]:
        infos = [ProcessInfo("supervisor", "", os.getpid())]
        infos += [ProcessInfo(c.role, c.label, c.process.pid) for c in self.children.values() if c.process.is_alive()]
        return infos

    def _start_child(self, role: str, index: int) -> None:
        parent_end, child_end = self.mp.Pipe()
        if role == "ingest":
            args: tuple[Any, ...] = (self.config, self.paths, self.sent, self.done, child_end)
            process = self.mp.Process(target=ingest_main, args=args, name="streamd-ingest")
        else:
            args = (index, self.config, self.paths, self.done, child_end)
            process = self.mp.Process(target=worker_main, args=args, name=f"streamd-worker-{index}")
        process.start()
        child_end.close()
        self.children[(role, index)] = Child(role, index, process, parent_end)

    def _await_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not all(c.ready for c in self.children.values()):
            if time.monotonic() > deadline:
                msg = "children did not report ready within 30 s"
                raise StartupError(msg)
            self._poll_children(timeout=_TICK_S, starting=True)

    def _alive(self, role: str, index: int) -> bool:
        child = self.children.get((role, index))
        return bool(child and child.ready and child.process.is_alive())

    # main loop ------------------------------------------------------------------------
    def main_loop(self) -> None:
        last_status = time.monotonic()
        last_watchdog = 0.0
        watchdog_every = self.notifier.watchdog_interval()
        progress = ([0] * self.n_workers, time.monotonic())
        while True:
            while self.pending_signals:
                signum = self.pending_signals.pop(0)
                if signum == signal.SIGHUP:
                    self.handle_hup()
                else:
                    self.log.info("stopping", extra={"signal": signal.Signals(signum).name})
                    return
            self._poll_children(timeout=_TICK_S)
            if not self._alive("ingest", 0):
                self.log.error(
                    "ingest process died; stopping", extra={"exitcode": self.children["ingest", 0].process.exitcode}
                )
                self.exit_code = 1
                return
            self._restart_dead_workers()
            now = time.monotonic()
            if watchdog_every and now - last_watchdog >= watchdog_every and self._healthy(progress):
                self.notifier.watchdog()
                last_watchdog = now
            if now - last_status >= _STATUS_EVERY_S:
                progress = self._report_status(progress, now - last_status)
                last_status = now

    def _poll_children(self, timeout: float, starting: bool = False) -> None:
        by_conn = {c.conn: c for c in self.children.values() if not c.conn.closed}
        for ready in wait(list(by_conn), timeout=timeout):
            child = by_conn[ready]  # type: ignore[index]
            conn = child.conn
            try:
                message = conn.recv()
            except (EOFError, OSError):
                conn.close()
                if starting and not child.ready:
                    msg = f"{child.role} {child.label} exited during start-up (exit code {child.process.exitcode})"
                    child.process.join(timeout=1)
                    raise StartupError(msg) from None
                continue
            self._on_child_message(child, message, starting)

    def _on_child_message(self, child: Child, message: tuple[Any, ...], starting: bool) -> None:
        kind = message[0]
        if kind == "ready":
            child.ready = True
        elif kind == "error" and starting:
            raise StartupError(message[1])
        elif kind == "error":
            self.log.error("child failed", extra={"role": child.role, "worker": child.label, "error": message[1]})

    def _restart_dead_workers(self) -> None:
        for index in range(self.n_workers):
            child = self.children["worker", index]
            if child.process.exitcode is not None:
                self._replace_worker(child)

    def _replace_worker(self, child: Child) -> None:
        index = child.index
        exitcode = child.process.exitcode
        mark_process_dead(child.process.pid, self.paths.metrics_dir)  # type: ignore[no-untyped-call]
        child.conn.close()
        self.restarts[str(index)] += 1
        self.log.error(
            "worker died, restarting",
            extra={"worker": index, "exitcode": exitcode, "restarts": self.restarts[str(index)]},
        )
        ingest = self.children["ingest", 0]
        ingest.conn.send(("worker_lost", index))
        self._await_reset(ingest.conn, index)
        time.sleep(self.backoff[index] if self.restarts[str(index)] > 1 else 0)
        self.backoff[index] = min(_MAX_BACKOFF_S, self.backoff[index] * 2)
        self._start_child("worker", index)

    def _await_reset(self, conn: Connection, index: int) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and conn.poll(deadline - time.monotonic()):
            message = conn.recv()
            if message == ("worker_reset", index):
                return
        self.log.warning("ingest did not acknowledge the worker reset in time", extra={"worker": index})

    def _healthy(self, progress: tuple[list[int], float]) -> bool:
        if not all(self._alive("worker", i) for i in range(self.n_workers)):
            return False
        seen, since = progress
        stalled = any(self.sent[i] > self.done[i] and self.done[i] == seen[i] for i in range(self.n_workers))
        return not (stalled and time.monotonic() - since > _STALL_S)

    def _report_status(self, progress: tuple[list[int], float], elapsed: float) -> tuple[list[int], float]:
        seen, _ = progress
        done = list(self.done[:])
        rate = sum(d - s for d, s in zip(done, seen, strict=True)) / elapsed if elapsed > 0 else 0.0
        up = sum(self._alive("worker", i) for i in range(self.n_workers))
        backlog = sum(max(0, self.sent[i] - self.done[i]) for i in range(self.n_workers))
        self.notifier.status(
            f"{rate:,.0f} ticks/s processed, backlog {backlog} ticks, {up}/{self.n_workers} workers up"
        )
        return done, time.monotonic()

    # reload ---------------------------------------------------------------------------
    def handle_hup(self) -> None:
        """Re-read the config; apply signals, batching and log level; keep the old one if it is bad."""
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
        fixed = {"ingest": new.ingest, "publish": new.publish, "metrics": new.metrics, "workers": new.workers}
        changed = [name for name, value in fixed.items() if getattr(self.config, name) != value]
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
        )
        logging.getLogger().setLevel(self.config.log.level.upper())
        self.children["ingest", 0].conn.send(("reconfigure", self.config))
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
        ingest = self.children.get(("ingest", 0))
        if ingest is not None and ingest.process.is_alive():
            with contextlib.suppress(OSError):
                ingest.conn.send(("stop",))
        for child in self.children.values():
            child.process.join(max(0.0, deadline - time.monotonic()))
        stragglers = [c for c in self.children.values() if c.process.is_alive()]
        for child in stragglers:
            self.log.warning("did not stop in time, killing", extra={"role": child.role, "worker": child.label})
            child.process.kill()
            child.process.join(2)
        if stragglers:
            self.exit_code = self.exit_code or 1
        self.forwarder.stop()
        self.http_server.shutdown()
        self.ctx.term()
        self.paths.remove()
        self.log.info("streamd stopped", extra={"exit_code": self.exit_code})

    def abort(self) -> None:
        """Tear down after a failed start-up."""
        for child in self.children.values():
            if child.process.is_alive():
                child.process.kill()
                child.process.join(2)
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
