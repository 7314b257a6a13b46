"""Analytics worker process: applies tick batches to rolling windows and publishes signals.

One worker per core. It binds a PULL socket that every ingest process feeds, drains it
without blocking after each wake-up, merges what it drained into one engine call (so a
backlog is cleared in large, cheap batches), publishes what subscribers want to the
supervisor's forwarder (:mod:`streamd.publisher`), which fans every worker's signals out on the
one public endpoint, and then acks each ingest it heard from, which is how an ingest knows the
worker is free for its next batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import zmq

from streamd.checkpoint import Checkpoint
from streamd.config import Config, SignalSpec
from streamd.control import CheckpointNow, Failed, Ready, Reload, Stop
from streamd.fencing import FENCE_FIELDS, PartitionView
from streamd.journal import ReplayFilter
from streamd.keytable import KeyTable
from streamd.ledger import TickLedger
from streamd.logs import RateLimiter, apply_log_config, setup_logging
from streamd.metrics import WorkerMetrics
from streamd.persistence import CheckpointWriter, Restored, Written, checkpoint_path, iso, load_for_worker
from streamd.publisher import SignalPublisher, Subscriptions
from streamd.runtime import (
    RuntimePaths,
    die_with_parent,
    freeze_startup_objects,
    name_process,
    zmq_context_that_sends_in_bursts,
)
from streamd.transport import EndOfInput, PartitionDropped, PartitionOwned, WorkerBatch, decode, encode_ack
from streamd.windows import KERNEL, Engine

_DRAIN_LIMIT = 256  # messages per wake-up before the worker processes what it has
# Ticks merged into one engine call at most: the call's temporaries grow with it, so a deep backlog
# is applied in calls of this size instead of one call holding gigabytes.
_DRAIN_TICKS = 100_000
# Released slots (keys the ingest evicted) a drain takes at most: about 2.5 ms of unmapping, so
# that a flood's evictions are unmapped in steps and live ticks wait no longer (their state is
# dropped later still, between batches: Worker._evict_released).
_DRAIN_RELEASES = 8_192
# Released keys whose state is dropped per turn of the main loop when no batch waits (about 1 ms),
# and how many may wait for that before a turn drops the excess at once.
_EVICT_STEP = 2_048
_EVICT_BACKLOG = 65_536
_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: flag enums cost in a loop
_RETIRE_EVERY_S = 1.0  # how often tables of replaced ingest incarnations are looked at
_RETIRE_GRACE_S = 5.0  # a replaced incarnation that sent nothing for this long has nothing left queued


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
        self.next_retire = 0.0
        self.limited = RateLimiter(self.log, config.log.rate_limit_per_s)
        self.replay = ReplayFilter([0] * self.ingests, [0] * self.ingests)
        self.writer: CheckpointWriter | None = None
        self.last_checkpoint = time.monotonic()
        self.dirty = False  # batches applied since the last checkpoint
        self.newest_event_ns = 0
        self.running = True
        self.orphaned = False  # the supervisor died: nobody reads our signals any more
        self.subscriptions = Subscriptions()

    def startup(self) -> None:
        self.ctx = zmq_context_that_sends_in_bursts()
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
        self.pub = self.ctx.socket(zmq.XPUB)  # a PUB that also hears the subscriptions (Subscriptions)
        self.pub.setsockopt(zmq.SNDHWM, self.config.publish.sndhwm)
        self.pub.setsockopt(zmq.XPUB_NODROP, 1)
        self.pub.setsockopt(zmq.LINGER, 2000)
        self.pub.connect(self.paths.forwarder_endpoint)
        self.publishers = self._publishers(self.config.signals)
        self._restore()
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
            self._hear_subscriptions()
            self._drain()
            self._evict_released()
            for publisher in self.publishers:
                publisher.flush_due(self.table.keys)
            self._retire_orphaned_keys()
            self._write_off_lost_batches()
            self._maybe_checkpoint()
            self._on_control()

    def _hear_subscriptions(self) -> None:
        """Apply what subscribers asked for since the last look, before anything is published."""
        while True:
            try:
                message = self.pub.recv(_NOBLOCK)
            except zmq.Again:
                return
            self.subscriptions.apply(message)

    def _poll_timeout_ms(self) -> int:
        if self.table.dying:
            return 0  # released keys' state is dropped between batches: come back at once
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
                elif isinstance(message, CheckpointNow):
                    self.last_checkpoint = -math.inf
        except (EOFError, OSError):
            self.log.error("supervisor is gone; worker exiting", extra={"worker": self.index})
            self.running = False
            self.orphaned = True

    def _drain(self) -> None:
        """Receive everything queued (bounded) and apply it: known keys' batches first (see :func:`known_first`)."""
        batches: list[WorkerBatch] = []
        ticks = releases = 0
        for _ in range(_DRAIN_LIMIT):
            if ticks >= _DRAIN_TICKS or releases >= _DRAIN_RELEASES:
                break
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
                ticks += len(message.t)
                releases += len(message.gone)
            else:
                self.metrics.stale_batches.inc()
        for part in known_first(batches):
            self._process(part)

    def _process(self, batches: list[WorkerBatch]) -> None:
        """Apply the batches (:meth:`_apply`) and time it, apart for batches that announce or release keys."""
        if not batches:
            return
        started = time.perf_counter()
        self._apply(batches, started)
        changing = any(batch.new_keys or batch.gone for batch in batches)
        timer = self.metrics.apply_new_or_gone if changing else self.metrics.apply_known
        timer.observe(time.perf_counter() - started)

    def _apply(self, batches: list[WorkerBatch], started: float) -> None:
        """Map, apply and publish the batches as one engine call; released keys are unmapped here and
        their state dropped later (:meth:`_evict_released`).

        Per batch: its new keys are mapped before its ticks, its gone slots unmapped after them,
        so a slot the ingest reuses in a later batch of the same drain is never confused.
        """
        sorted_ = self.replay.sort(self._to_local(batches, started), started)
        if sorted_.missing:
            self.limited.warning(
                "replay_gap", "ticks missing from the replay: these windows lack them", ticks=sorted_.missing
            )
        if sorted_.filled:
            self.log.info("a replaced ingest's overtaken batches arrived: gap filled", extra={"ticks": sorted_.filled})
        if sorted_.quiet:
            self._apply_quietly(sorted_.quiet)
        self.dirty = True
        if sorted_.new:
            slots, t, p, q = self._columns(sorted_.new)
            results, late = self.engine.process(slots, t, p, q)
            for publisher, result in zip(self.publishers, results, strict=True):
                publisher.publish(result if self.view is None else self.view.visible(result), self.table.keys)
        if not sorted_.new:
            self._settle(batches, 0, 0)
            return
        now = time.time_ns()
        newest = int(t.max()) if len(t) else now
        self.newest_event_ns = max(self.newest_event_ns, newest)
        self._record(sorted_.new, now, newest, started)
        self._settle(batches, len(t), late)

    def _to_local(self, batches: list[WorkerBatch], now: float) -> list[WorkerBatch]:
        """The batches with ingest slots replaced by local key indices.

        Per batch: its new keys are mapped before its ticks, its gone slots unmapped after them,
        so a slot the ingest reuses in a later batch of the same drain is never confused.
        """
        table, local = self.table, []
        for batch in batches:
            new = table.learn(batch.ingest, batch.ingest_generation, batch.new_keys)
            if self.view is not None and new:
                self.view.learn(table.indices(new), new)
            slots = table.local(batch.ingest, batch.ingest_generation, batch.slots, now)
            table.forget(batch.ingest, batch.ingest_generation, batch.gone)
            local.append(dataclasses.replace(batch, slots=slots))
        return local

    def _columns(self, batches: list[WorkerBatch]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Local key indices and tick columns of ``batches`` (already local), concatenated in arrival order."""
        slots, t, p, q = (
            np.concatenate(cols) if len(batches) > 1 else cols[0]
            for cols in zip(*((b.slots, b.t, b.p, b.q) for b in batches), strict=True)
        )
        return slots, t, p, q

    def _apply_quietly(self, batches: list[WorkerBatch]) -> None:
        """Replayed ticks a dead predecessor had applied, counted and published: rebuild the windows,
        and re-hold each key's newest row where ``emit_interval`` may have kept it unsent."""
        slots, t, p, q = self._columns(batches)
        results, _ = self.engine.process(slots, t, p, q)
        for publisher, result in zip(self.publishers, results, strict=True):
            publisher.republish_held(result if self.view is None else self.view.visible(result))
        self.newest_event_ns = max(self.newest_event_ns, int(t.max()))
        self.metrics.replayed_quietly.inc(len(t))

    def _evict_released(self) -> None:
        """Drop the state of keys the ingests released, a step per turn of the main loop.

        Released keys are unmapped in order within each drain (a returning key gets a fresh index
        at once); dropping their state everywhere (engine rings, publisher tables, held rows) only
        frees their indices, so it waits for a turn with no batch queued. A flood's evictions then
        no longer lengthen the drains that live batches wait behind; a backlog past
        ``_EVICT_BACKLOG`` (a worker with no idle turn) is dropped at once.
        """
        pending = self.table.dying
        if not pending:
            return
        if pending <= _EVICT_BACKLOG and self.pull.poll(0):
            return
        self._evict(self.table.take_dying(max(_EVICT_STEP, pending - _EVICT_BACKLOG)))

    def _evict(self, indices: np.ndarray) -> None:
        """Drop every trace of keys no ingest routes any more; their indices become free for new keys."""
        if not len(indices):
            return
        for publisher in self.publishers:
            publisher.evict(indices, self.table.keys)
        self.engine.evict(indices)
        self.table.recycle(indices)
        self.metrics.keys_evicted.inc(len(indices))
        self.metrics.keys.set(self.engine.n_keys)
        self.metrics.state_bytes.set(self.engine.memory_bytes())

    def _retire_orphaned_keys(self) -> None:
        """Let go of keys no live ingest will ever release: those only a dead ingest incarnation mapped
        (a few seconds after its replacement), and restored ones no ingest announced within ``key_ttl``.
        They start dying like released keys, and :meth:`_evict_released` drops their state."""
        now = time.perf_counter()
        if now >= self.next_retire:
            self.next_retire = now + _RETIRE_EVERY_S
            self.table.retire_superseded(now, _RETIRE_GRACE_S)
            if self.config.state.key_ttl_ns:
                self.table.retire_unclaimed(now, self.config.state.key_ttl_ns / 1e9)

    def _write_off_lost_batches(self) -> None:
        """Count as ``ingest_lost`` the batches a dead ingest handed over that never came: its
        successor's batches overtook them more than ``_RETIRE_GRACE_S`` ago."""
        lost = self.replay.write_off(time.perf_counter(), _RETIRE_GRACE_S)
        if lost:
            self.metrics.ticks_dropped.labels("ingest_lost").inc(lost)
            self.limited.warning(
                "ingest_lost", "ticks a dead ingest had handed over never arrived: counted as lost", ticks=lost
            )

    def _settle(self, batches: list[WorkerBatch], ticks: int, late: int) -> None:
        """Count the ticks, mark them applied in the ledger, then ack each ingest heard from.

        The two counts are written back to back with no system call between them, so a
        kill -9 can hardly fall between "processed" and "applied" (which would count a batch
        twice or not at all); the acks, which wake an ingest that may take this CPU, go last.
        """
        self.metrics.ticks_processed.inc(ticks - late)
        if late:
            self.metrics.ticks_dropped.labels("late").inc(late)
        ingests = {batch.ingest for batch in batches}
        for ingest in ingests:
            self.ledger.mark_applied(ingest, self.index, self.replay.applied(ingest))
        ack = encode_ack(self.index, self.generation)
        for ingest in ingests:
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
        self.log.info("signals reconfigured", extra={"worker": self.index, "signals": len(config.signals)})

    def _publishers(self, signals: tuple[SignalSpec, ...]) -> list[SignalPublisher]:
        extra = FENCE_FIELDS if self.view is not None else ()
        return [SignalPublisher(spec, self.pub, self.metrics, self.subscriptions, extra) for spec in signals]

    # state that outlives the process ------------------------------------------------------
    def _restore(self) -> None:
        """Resume from ``state.dir``: windows from the checkpoint(s), and where each ingest's replay starts.

        Ticks a dead predecessor applied (the ledger's ``applied``) are replayed quietly. Without
        ``[state]`` nothing is replayed: the ledger's counts are where this worker starts.
        """
        applied = [self.ledger.applied(ingest, self.index) for ingest in range(self.ingests)]
        directory = self.config.state.dir
        if directory is None:
            self.replay = ReplayFilter(applied, applied)
            return
        self.writer = CheckpointWriter(self._on_checkpoint_written, self._on_checkpoint_failed)
        workers = self.config.workers.resolved_count()
        restored = load_for_worker(directory, self.index, workers, self.ledger.run_id, self.log)
        resume = [0] * self.ingests
        if restored is not None:
            self._adopt(restored)
            if restored.applied is not None and len(restored.applied) == self.ingests:
                resume = list(restored.applied)
        self.replay = ReplayFilter(resume, applied)

    def _adopt(self, restored: Restored) -> None:
        self.table.restore(restored.keys, time.perf_counter())
        for name, reason in self.engine.restore(restored.parts).items():
            self.log.warning(
                "signal starts empty: its checkpointed state does not fit",
                extra={"worker": self.index, "signal": name, "reason": reason},
            )
        self.metrics.keys.set(self.engine.n_keys)
        self.metrics.state_bytes.set(self.engine.memory_bytes())
        newest = restored.newest
        self.newest_event_ns = max(source.newest_event_ns for source in restored.sources)
        now = time.time_ns()
        self.log.info(
            "windows restored from checkpoint",
            extra={
                "worker": self.index,
                "keys": len(restored.keys),
                "files": len(restored.sources),
                "written": iso(newest.wall_ns),
                "age_s": round((now - newest.wall_ns) / 1e9, 3),
            },
        )
        if restored.applied is None and not all(source.final for source in restored.sources):
            self.log.warning(
                "the previous run stopped without a final checkpoint: what it received after the checkpoint is lost",
                extra={
                    "worker": self.index,
                    "lost_from": iso(newest.wall_ns),
                    "lost_until": iso(now),
                    "newest_event_kept": iso(self.newest_event_ns) if self.newest_event_ns else "none",
                },
            )

    def _maybe_checkpoint(self, *, final: bool = False) -> None:
        """Every ``state.snapshot_interval`` (if anything changed), copy the state and write it in the background."""
        if self.writer is None or self.config.state.dir is None:
            return
        now = time.monotonic()
        due = self.dirty and now - self.last_checkpoint >= self.config.state.snapshot_interval_ns / 1e9
        if not final and (not due or self.writer.busy):
            return
        started = time.perf_counter()
        self._evict(self.table.take_dying())  # else a released key would come back from the file with its state
        checkpoint = Checkpoint(
            worker=self.index,
            workers=self.config.workers.resolved_count(),
            run_id=self.ledger.run_id,
            applied=tuple(self.replay.next_seq),
            wall_ns=time.time_ns(),
            newest_event_ns=self.newest_event_ns,
            final=final,
            keys=tuple(self.table.keys[: self.table.count]),
            state=self.engine.export_state(),
        )
        self.metrics.checkpoint_pause.observe(time.perf_counter() - started)
        self.last_checkpoint, self.dirty = now, False
        path = checkpoint_path(self.config.state.dir, checkpoint.worker, checkpoint.workers)
        if final:
            self.writer.wait()
            self.writer.write(path, checkpoint)
        else:
            self.writer.submit(path, checkpoint)

    def _on_checkpoint_written(self, written: Written) -> None:
        """(Writer thread.) The file is durable: each ingest may forget what it holds."""
        for ingest, upto in enumerate(written.checkpoint.applied):
            self.ledger.mark_checkpointed(ingest, self.index, upto)
        self.metrics.checkpoints.labels("written").inc()
        self.metrics.checkpoint_seconds.observe(written.seconds)

    def _on_checkpoint_failed(self, path: Path, error: OSError) -> None:
        self.metrics.checkpoints.labels("failed").inc()
        self.limited.warning("checkpoint_failed", "checkpoint not written", path=str(path), error=str(error))

    def shutdown(self) -> None:
        for publisher in self.publishers:
            publisher.flush_due(self.table.keys, everything=True)
        if not self.orphaned:
            self._maybe_checkpoint(final=True)
        self.pull.close(0)
        for sock in self.acks:
            sock.close(0)
        self.pub.close(0 if self.orphaned else None)
        self.ctx.term()
        self.log.info("worker stopped", extra={"worker": self.index})


def known_first(batches: list[WorkerBatch]) -> tuple[list[WorkerBatch], list[WorkerBatch]]:
    """Split a drain: batches of known keys alone, then the rest, each ingest's batches kept in order.

    A batch that announces new keys or releases gone ones is a flood's: thousands of keys to map
    or unmap, milliseconds of work. Applied and published on their own first, known keys' batches
    from other ingests (and an ingest's batches before its first such) do not wait for that work.
    """
    known: list[WorkerBatch] = []
    rest: list[WorkerBatch] = []
    held: set[int] = set()  # ingests with a batch in rest: their later batches follow it there
    for batch in batches:
        if batch.ingest in held or batch.new_keys or batch.gone:
            held.add(batch.ingest)
            rest.append(batch)
        else:
            known.append(batch)
    return known, rest


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
    freeze_startup_objects()
    worker.main_loop()
    worker.shutdown()
