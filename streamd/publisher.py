"""Where a signal leaves a worker: which rows subscribers want, ``emit_interval``, encoding, sending.

A worker's XPUB socket connects to the supervisor's forwarder, whose XSUB side passes on every
subscription its subscribers make (and replays them all to a worker that connects later). A
PUB socket drops a record no subscriber wants only once it has been named, encoded and sent
from Python; knowing the prefixes (:class:`Subscriptions`), a publisher skips those rows before
any of that work. Under a flood of new keys nobody subscribed to, that work was most of a
worker's time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import zmq

from streamd.config import SignalSpec
from streamd.metrics import WorkerMetrics
from streamd.records import encode_batch_record, encode_record_payloads, record_heads, topics_for
from streamd.windows import SignalResult

_SNDMORE = int(zmq.SNDMORE)  # plain ints: send_multipart and flag enums cost 3x two plain sends
_NOBLOCK = int(zmq.NOBLOCK)
_SUBSCRIBE, _UNSUBSCRIBE = 1, 0  # the first byte of a subscription message


class Subscriptions:
    """Subscribed topic prefixes, matched as ZeroMQ matches them: byte prefixes of the topic."""

    def __init__(self) -> None:
        self._count: dict[bytes, int] = {}  # prefix -> subscriptions to it
        self._lengths: list[int] = []  # distinct prefix lengths, shortest first
        self.version = 0  # bumped on every change: cached answers older than it are stale

    def apply(self, message: bytes) -> None:
        """One message from the XPUB socket: a subscribe (1) or unsubscribe (0) byte, then the prefix."""
        if not message or message[0] not in (_SUBSCRIBE, _UNSUBSCRIBE):
            return
        prefix = message[1:]
        count = self._count.get(prefix, 0) + (1 if message[0] == _SUBSCRIBE else -1)
        if count > 0:
            self._count[prefix] = count
        else:
            self._count.pop(prefix, None)
        self._lengths = sorted({len(p) for p in self._count})
        self.version += 1

    def covers(self, prefix: bytes) -> bool | None:
        """For every topic that starts with ``prefix``: all wanted (True), none (False), or it depends (None)."""
        if self.wants(prefix):
            return True
        return None if any(p.startswith(prefix) for p in self._count) else False

    def wants(self, topic: bytes) -> bool:
        """Whether some subscription is a prefix of ``topic``: one set lookup per distinct prefix length."""
        count = self._count
        return any(topic[:length] in count for length in self._lengths if length <= len(topic))

    def wants_each(self, topics: list[bytes]) -> np.ndarray:
        """:meth:`wants` of many topics, as a bool array: one C-level pass per distinct prefix
        length, not a Python loop per topic (a flood of new keys asks this once per key)."""
        wanted = np.zeros(len(topics), bool)
        contains = self._count.__contains__
        for length in self._lengths:
            wanted |= np.fromiter(map(contains, [topic[:length] for topic in topics]), bool, len(topics))
        return wanted


class Throttle:
    """``emit_interval``: at most one row per key per interval (wall clock), newest wins."""

    def __init__(self, interval_ns: int, stats: Sequence[str]) -> None:
        self.interval_ns = interval_ns
        self.stats = tuple(stats)
        self.last_emit = np.zeros(0, np.int64)
        self.pending = np.zeros(0, bool)
        self.pending_t = np.zeros(0, np.int64)
        self.pending_values = np.zeros((len(self.stats), 0))

    def _grow(self, n_slots: int) -> None:
        extra = n_slots - len(self.last_emit)
        if extra <= 0:
            return
        extra = max(extra, len(self.last_emit))
        self.last_emit = np.concatenate([self.last_emit, np.full(extra, np.iinfo(np.int64).min // 2)])
        self.pending = np.concatenate([self.pending, np.zeros(extra, bool)])
        self.pending_t = np.concatenate([self.pending_t, np.zeros(extra, np.int64)])
        self.pending_values = np.concatenate([self.pending_values, np.zeros((len(self.stats), extra))], axis=1)

    def admit(self, result: SignalResult, now_ns: int) -> SignalResult:
        """Rows that may go out now; the others wait in ``pending`` (newest wins)."""
        self._grow(int(result.slots.max()) + 1 if len(result.slots) else 0)
        due = self.last_emit[result.slots] + self.interval_ns <= now_ns
        held = result.slots[~due]
        self.pending[held] = True
        self.pending_t[held] = result.t[~due]
        for row, name in enumerate(self.stats):
            self.pending_values[row, held] = result.stats[name][~due]
        sent = result.slots[due]
        self.pending[sent] = False
        self.last_emit[sent] = now_ns
        return SignalResult(sent, result.t[due], {name: col[due] for name, col in result.stats.items()})

    def hold(self, result: SignalResult) -> None:
        """Hold these rows (newest wins) to go out at the next interval, whatever was sent before."""
        self._grow(int(result.slots.max()) + 1 if len(result.slots) else 0)
        self.pending[result.slots] = True
        self.pending_t[result.slots] = result.t
        for row, name in enumerate(self.stats):
            self.pending_values[row, result.slots] = result.stats[name]

    def release(self, slots: np.ndarray) -> SignalResult | None:
        """Forget these keys (they are evicted); return their held rows, which go out now."""
        slots = slots[slots < len(self.pending)]
        held = slots[self.pending[slots]]
        self.pending[slots] = False
        self.last_emit[slots] = np.iinfo(np.int64).min // 2
        if not len(held):
            return None
        stats = {name: self.pending_values[row, held] for row, name in enumerate(self.stats)}
        return SignalResult(held, self.pending_t[held], stats)

    def due(self, now_ns: int, *, everything: bool = False) -> SignalResult | None:
        """Held rows whose interval has elapsed (all held rows when ``everything``, at shutdown)."""
        if not len(self.pending):
            return None
        ready = self.pending if everything else self.pending & (self.last_emit + self.interval_ns <= now_ns)
        slots = np.flatnonzero(ready)
        if not len(slots):
            return None
        self.pending[slots] = False
        self.last_emit[slots] = now_ns
        stats = {name: self.pending_values[row, slots] for row, name in enumerate(self.stats)}
        return SignalResult(slots, self.pending_t[slots], stats)

    def forget(self, slots: np.ndarray) -> None:
        """Rows held for these keys are not sent (their partition left this instance)."""
        self.pending[slots[slots < len(self.pending)]] = False


class SignalPublisher:
    """Publishes one signal's rows in record or batch mode, honouring ``emit_interval``.

    Rows whose topic no subscriber wants are counted as published but never named, encoded or
    sent: the PUB socket would have dropped them, after all that work.
    """

    def __init__(
        self,
        spec: SignalSpec,
        sock: zmq.Socket[Any],
        metrics: WorkerMetrics,
        subscriptions: Subscriptions,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.spec = spec
        self.fields = (*spec.stats, *extra)  # extra: per-row fields beside the stats (cluster: part, fence)
        self._sock = sock
        self._subscriptions = subscriptions
        self._batch_topic = spec.name.encode()
        self._topics = np.empty(0, dtype=object)  # per local key index, built when first needed
        self._heads = np.empty(0, dtype=object)  # per local key index, built when first published
        self._has_topic = np.zeros(0, bool)
        self._has_head = np.zeros(0, bool)
        self._wanted = np.zeros(0, bool)  # per local key index: some subscriber wants its topic
        self._checked = np.zeros(0, bool)  # per local key index: _wanted is as of _checked_version
        self._checked_version = subscriptions.version
        self._record_prefix = f"{spec.name}.".encode()
        self._covered = subscriptions.covers(self._record_prefix)  # all, none, or per key (None)
        self._published = metrics.signals_published.labels(spec.name)
        self._messages = metrics.publish_messages.labels(spec.name)
        self._dropped = metrics.publish_dropped.labels(spec.name)
        self._throttle = Throttle(spec.emit_interval_ns, self.fields) if spec.emit_interval_ns else None

    def evict(self, indices: np.ndarray, keys: np.ndarray) -> None:
        """These keys' state is being dropped: their held rows go out now, their names are forgotten."""
        if self._throttle is not None:
            result = self._throttle.release(indices)
            if result is not None:
                self._send(result, keys, time.time_ns())
        known = indices[indices < len(self._topics)]
        self._topics[known] = self._heads[known] = None
        self._has_topic[known] = self._has_head[known] = self._checked[known] = False

    def _cover(self, keys: np.ndarray) -> None:
        """Per-key tables long enough for every local key index."""
        extra = len(keys) - len(self._topics)
        if extra > 0:
            self._topics = np.concatenate([self._topics, np.full(extra, None)])
            self._heads = np.concatenate([self._heads, np.full(extra, None)])
            self._has_topic = np.concatenate([self._has_topic, np.zeros(extra, bool)])
            self._has_head = np.concatenate([self._has_head, np.zeros(extra, bool)])
            self._wanted = np.concatenate([self._wanted, np.zeros(extra, bool)])
            self._checked = np.concatenate([self._checked, np.zeros(extra, bool)])

    def _topics_of(self, slots: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Topics of these key indices, built once per key lifetime."""
        missing = slots[~self._has_topic[slots]]
        if len(missing):
            self._topics[missing] = topics_for(self.spec.name, keys[missing].tolist())
            self._has_topic[missing] = True
        topics: np.ndarray = self._topics[slots]
        return topics

    def _heads_of(self, slots: np.ndarray, keys: np.ndarray) -> list[bytes]:
        """Record heads of these key indices, built once per key lifetime, when first published."""
        missing = slots[~self._has_head[slots]]
        if len(missing):
            self._heads[missing] = record_heads(self.spec.name, keys[missing].tolist(), len(self.fields))
            self._has_head[missing] = True
        heads: list[bytes] = self._heads[slots].tolist()
        return heads

    def _wanted_rows(self, slots: np.ndarray, keys: np.ndarray) -> np.ndarray | None:
        """Which rows some subscriber wants (None: all of them); answers are cached per key until
        the subscriptions change, and only looked up for keys a batch touches."""
        subscriptions = self._subscriptions
        if subscriptions.version != self._checked_version:
            self._checked[:] = False
            self._checked_version = subscriptions.version
            self._covered = subscriptions.covers(self._record_prefix)
        if self._covered is not None:
            return None if self._covered else np.zeros(len(slots), bool)
        unchecked = slots[~self._checked[slots]]
        if len(unchecked):
            self._wanted[unchecked] = subscriptions.wants_each(self._topics_of(unchecked, keys).tolist())
            self._checked[unchecked] = True
        wanted: np.ndarray = self._wanted[slots]
        return wanted

    def publish(self, result: SignalResult, keys: np.ndarray) -> None:
        now_ns = time.time_ns()
        if self._throttle is not None:
            result = self._throttle.admit(result, now_ns)
        self._send(result, keys, now_ns)

    def forget(self, slots: np.ndarray) -> None:
        if self._throttle is not None:
            self._throttle.forget(slots)

    def republish_held(self, result: SignalResult) -> None:
        """Rows of ticks a dead predecessor applied: with ``emit_interval`` it may have held the newest
        of them unsent, so each key's newest goes out again at the next interval (a duplicate at
        worst); without, it sent every one of them already."""
        if self._throttle is not None:
            self._throttle.hold(result)

    def flush_due(self, keys: np.ndarray, *, everything: bool = False) -> None:
        if self._throttle is None:
            return
        now_ns = time.time_ns()
        result = self._throttle.due(now_ns, everything=everything)
        if result is not None:
            self._send(result, keys, now_ns)

    def _send(self, result: SignalResult, keys: np.ndarray, pub_ns: int) -> None:
        """Publish rows stamped ``pub_ns``; a full queue to the forwarder drops them, counted, never
        counted as published.

        ``pub_ns`` is the clock reading ``emit_interval`` admitted the rows by, so the stamps a
        subscriber sees are at least the interval apart per key.

        The PUB socket has ``XPUB_NODROP`` set, so at its high-water mark a non-blocking send
        raises instead of silently discarding the message.
        """
        rows = len(result.slots)
        if not rows:
            return
        self._cover(keys)
        if self.spec.publish == "batch":
            sent = self._send_batch(result, keys, pub_ns) if self._subscriptions.wants(self._batch_topic) else rows
        else:
            sent = self._send_records(result, keys, pub_ns)
        self._published.inc(sent)
        if sent < rows:
            self._dropped.inc(rows - sent)

    def _send_batch(self, result: SignalResult, keys: np.ndarray, pub_ns: int) -> int:
        """All rows as one columnar message; returns the rows that left (all or none)."""
        stats = {name: result.stats[name] for name in self.fields}
        topic, payload = encode_batch_record(self.spec.name, keys[result.slots].tolist(), result.t, stats, pub_ns)
        try:
            self._sock.send(topic, _SNDMORE | _NOBLOCK)
        except zmq.Again:
            return 0
        self._sock.send(payload)
        self._messages.inc()
        return len(result.slots)

    def _send_records(self, result: SignalResult, keys: np.ndarray, pub_ns: int) -> int:
        """One message per row some subscriber wants; returns the rows that left or were not wanted."""
        slots, t, rows = result.slots, result.t, len(result.slots)
        wanted = self._wanted_rows(slots, keys)
        stats = {name: result.stats[name] for name in self.fields}
        if wanted is not None:
            slots, t, stats = slots[wanted], t[wanted], {name: column[wanted] for name, column in stats.items()}
        unwanted = rows - len(slots)
        if not len(slots):
            return unwanted
        payloads = encode_record_payloads(self._heads_of(slots, keys), t, stats, pub_ns)
        send = self._sock.send
        sent = 0
        for topic, payload in zip(self._topics_of(slots, keys).tolist(), payloads, strict=True):
            try:
                send(topic, _SNDMORE | _NOBLOCK)
            except zmq.Again:
                continue
            send(payload)
            sent += 1
        self._messages.inc(sent)
        return unwanted + sent
