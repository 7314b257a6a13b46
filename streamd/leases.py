"""Partition ownership: leases in a JetStream KV bucket, assigned by balanced, sticky rendezvous hashing.

Every instance runs one :class:`LeaseManager`. In the bucket ``streamd_leases`` (replicated,
``max_age = lease_ttl``, so an entry not rewritten within the TTL disappears):

- ``member.<name>``: the instance's heartbeat, rewritten every ``lease_ttl / 3``;
- ``lease.<p>``: the owner of partition ``p``, rewritten (compare-and-set on its last
  revision) at the same pace while the owner holds it.

Each round, a manager computes :func:`assign` over the live members and the current owners,
acquires the free partitions assigned to it (``create``: succeeds only if nobody holds the
lease), releases those it holds but is not assigned (``delete`` at its revision), and renews
the rest. Losing a compare-and-set means somebody else owns the partition now: it is dropped
at once.

Safety does not depend on clocks agreeing across hosts. A manager counts a lease as its own
only until ``sent + lease_ttl - margin``, where ``sent`` is its own monotonic time when it
*sent* the last successful write; the server ages the entry out ``lease_ttl`` after it
*stored* it, which is later. So the old owner has stopped claiming a partition before the
server lets anyone else create the lease. Expiry of others' entries is likewise judged from
when this manager *received* them, which can only make it late, never early.

The fencing token of an ownership term is the KV revision at which the lease was acquired.
KV revisions are the sequence numbers of one stream, so a later owner's token is always
greater than any earlier owner's: downstream, a record stamped with a smaller token than one
already seen for its partition comes from a deposed owner and can be discarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import KeyValueConfig
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from streamd.jetstream import cancel_and_wait

LEASES_BUCKET = "streamd_leases"
_MEMBER = "member."
_LEASE = "lease."
_MARGIN = 1 / 6  # of the TTL: how much sooner than the server a holder stops counting a lease
_T = TypeVar("_T")
_BUCKET_PATIENCE_S = 30.0  # how long start() keeps asking for the lease bucket and its watch
_RETRY_S = 0.25  # after a failed renewal round: retry this soon, to keep leases through a short election
_VIEW_SETTLE_S = 1.0  # a young view waits this long (at most an interval): peers retry their heartbeats faster
_ATTEMPT_S = 1.0  # longest wait for one bucket operation, so retries keep that pace while the bucket elects
_WRONG_REVISION = (10071, 10164)  # JetStream's "wrong last sequence" codes: nats-py raises them raw from delete
NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError)  # a bucket operation failed


def rendezvous_score(member: str, partition: int) -> int:
    """Highest-random-weight score of ``member`` for ``partition``: stable across processes and hosts."""
    digest = hashlib.blake2b(f"{member}/{partition}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def assign(partitions: int, members: Sequence[str], current: Mapping[int, str]) -> dict[int, str]:
    """Map every partition to a member: balanced within one, sticky, the same answer on every instance.

    Each member's quota is ``partitions // n`` or one more (the extra slots go to the members
    holding most, so nobody is forced to give one up). A member keeps what it holds up to its
    quota, preferring its highest rendezvous scores; every other partition goes to the
    highest-scoring member with room left. So a member leaving moves only its partitions, a
    member joining takes about ``1/n`` from the others, and applying the answer again changes
    nothing.
    """
    live = sorted(set(members))
    if not live:
        return {}
    base, extra = divmod(partitions, len(live))
    holding = {m: 0 for m in live}
    for partition, owner in current.items():
        if owner in holding and 0 <= partition < partitions:
            holding[owner] += 1
    ranked = sorted(live, key=lambda m: (-holding[m], m))
    quota = {m: base + (i < extra) for i, m in enumerate(ranked)}
    result: dict[int, str] = {}
    for member in live:
        mine = sorted(
            (p for p, owner in current.items() if owner == member and 0 <= p < partitions),
            key=lambda p: -rendezvous_score(member, p),
        )
        result.update(dict.fromkeys(mine[: quota[member]], member))
    load = {m: sum(1 for owner in result.values() if owner == m) for m in live}
    for partition in range(partitions):
        if partition in result:
            continue
        member = max((m for m in live if load[m] < quota[m]), key=lambda m: rendezvous_score(m, partition))
        result[partition] = member
        load[member] += 1
    return result


async def _patiently(operation: Callable[[], Awaitable[_T]]) -> _T:
    """``operation()``, retried for a while: a young or busy cluster times out on the first tries."""
    deadline = time.monotonic() + _BUCKET_PATIENCE_S
    while True:
        try:
            return await operation()
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.5)


async def _next_update(watcher: KeyValue.KeyWatcher, timeout: float | None) -> KeyValue.Entry | None:
    """The watcher's next entry (None once, after the initial values); a typed face on nats-py's untyped call."""
    entry: KeyValue.Entry | None = await watcher.updates(timeout)  # type: ignore[no-untyped-call]
    return entry


@dataclass(frozen=True)
class LeaseEvent:
    """A change of this instance's ownership. ``lost``: taken away (expired or lost a compare-and-set)."""

    kind: Literal["acquired", "released", "lost"]
    partition: int
    token: int  # the fencing token of the ownership term that began or ended


@dataclass
class _Held:
    token: int  # revision at acquisition: the fencing token
    revision: int  # latest revision written, for the next compare-and-set
    valid_until: float  # this manager's clock


@dataclass
class _Seen:
    value: str
    revision: int
    received: float  # this manager's clock when the entry arrived


class LeaseManager:
    """Heartbeat, assign, acquire, renew and release partition leases for one instance.

    ``start()`` joins and begins the rounds; ``owned()`` is safe to call at any time (it checks
    validity against the clock); ``stop()`` releases everything, ``stop(release=False)`` just
    stops, as a crash would, leaving the leases to expire.
    """

    def __init__(
        self,
        nc: Client,
        name: str,
        partitions: int,
        ttl_s: float,
        *,
        replicas: int = 3,
        bucket: str = LEASES_BUCKET,
        on_change: Callable[[LeaseEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nc = nc
        self.name = name
        self.partitions = partitions
        self.ttl_s = ttl_s
        self.interval_s = ttl_s / 3
        self.replicas = replicas
        self.bucket = bucket
        self.on_change = on_change
        self.clock = clock
        self.changes = 0
        self._held: dict[int, _Held] = {}
        self._lapsed: dict[int, int] = {}  # partition -> the revision we last wrote, for a lease that lapsed
        self._seen: dict[str, _Seen] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._view_since = -float("inf")  # when the view of the bucket became trustworthy

    # public -------------------------------------------------------------------------------
    def owned(self) -> dict[int, int]:
        """Partitions this instance owns right now, with their fencing tokens."""
        now = self.clock()
        return {p: held.token for p, held in self._held.items() if now < held.valid_until}

    async def start(self) -> None:
        """Find or create the bucket (a generous timeout: a young cluster answers slowly), then join."""
        self.kv = await _patiently(lambda: self._bucket(self.nc.jetstream(timeout=5)))
        await self._heartbeat()
        self._watcher = await _patiently(self.kv.watchall)
        first = await _next_update(self._watcher, timeout=5)
        self._view_since = self.clock()
        self._watch_task = asyncio.create_task(self._follow(first))
        self._task = asyncio.create_task(self._run())

    async def stop(self, *, release: bool = True) -> None:
        await cancel_and_wait([task for task in (self._task, self._watch_task) if task is not None])
        if self._watcher is not None:
            with contextlib.suppress(*NATS_ERRORS):
                await self._watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves KeyWatcher untyped
        if release:
            await asyncio.gather(*(self._release(p) for p in list(self._held)))
            with contextlib.suppress(*NATS_ERRORS):
                await self.kv.delete(_MEMBER + self.name)

    # the rounds ---------------------------------------------------------------------------
    async def _bucket(self, js: nats.js.JetStreamContext) -> KeyValue:
        """The lease bucket, found or created."""
        try:
            return await js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            config = KeyValueConfig(bucket=self.bucket, history=1, ttl=self.ttl_s, replicas=self.replicas)
            return await js.create_key_value(config)

    async def _run(self) -> None:
        """Renew on the heartbeat's schedule; rebalance after every round and whenever the bucket changed."""
        next_renewal = self.clock()
        while True:
            self._expire_own()
            if self.clock() >= next_renewal:
                started = self.clock()
                done = await asyncio.gather(self._heartbeat(), *(self._renew(p) for p in list(self._held)))
                next_renewal = started + (self.interval_s if all(done) else _RETRY_S)
            self._wakeup.clear()
            await self._rebalance()
            settles = self._view_settled_at()
            wake_at = min(next_renewal, settles) if settles > self.clock() else next_renewal
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), max(0.0, wake_at - self.clock()))

    async def _rebalance(self) -> None:
        """Release what the assignment gives to others, then try to take the free partitions it gives us.

        Not while the view is young (just rebuilt, or the bucket just came back): peers' heartbeats
        are not in it yet (they retry every 0.25 s), and acting on it would take partitions only
        to hand them back.
        """
        if self.clock() < self._view_settled_at():
            return
        wanted = assign(self.partitions, self._live_members(), self._current_owners())
        for partition in [p for p in self._held if wanted.get(p) != self.name]:
            await self._release(partition)
        self._lapsed = {p: revision for p, revision in self._lapsed.items() if wanted.get(p) == self.name}
        mine = [p for p, m in wanted.items() if m == self.name and p not in self._held]
        free = [p for p in mine if p not in self._lapsed and self._is_free(p)]
        await asyncio.gather(*(self._reclaim(p) for p in mine if p in self._lapsed), *(self._acquire(p) for p in free))

    def _view_settled_at(self) -> float:
        """When the view may be acted on: the first round after that instant rebalances."""
        return self._view_since + min(self.interval_s, _VIEW_SETTLE_S)

    def _expire_own(self) -> None:
        now = self.clock()
        for partition, held in list(self._held.items()):
            if now >= held.valid_until:
                self._lapsed[partition] = held.revision
                self._drop(partition, "lost")

    async def _heartbeat(self) -> bool:
        """Rewrite our membership; the first success after failures makes the view young again."""
        try:
            await self._bounded(self.kv.put(_MEMBER + self.name, self.name.encode()))
        except NATS_ERRORS:
            self._view_since = float("inf")
            return False
        if self._view_since == float("inf"):
            self._view_since = self.clock()
        return True

    async def _renew(self, partition: int) -> bool:
        """False only when the bucket could not be reached (the lease still counts until ``valid_until``)."""
        held = self._held.get(partition)
        if held is None:
            return True
        key = _LEASE + str(partition)
        sent = self.clock()
        try:
            revision = await self._bounded(self.kv.update(key, self.name.encode(), last=held.revision))
        except nats.js.errors.KeyWrongLastSequenceError:
            seen = self._seen.get(key)
            if seen is not None and seen.value == self.name and seen.revision > held.revision:
                held.revision = seen.revision  # our own renewal whose ack timed out; validity waits for the next
            else:
                self._drop(partition, "lost")
            return True
        except NATS_ERRORS:
            return False
        if self._held.get(partition) is held:
            held.revision = revision
            held.valid_until = sent + self.ttl_s * (1 - _MARGIN)
        return True

    async def _acquire(self, partition: int) -> None:
        sent = self.clock()
        try:
            revision = await self._bounded(self.kv.create(_LEASE + str(partition), self.name.encode()))
        except NATS_ERRORS:
            return  # somebody holds it still (or the cluster is busy): try again next round
        self._held[partition] = _Held(revision, revision, sent + self.ttl_s * (1 - _MARGIN))
        self._notify(LeaseEvent("acquired", partition, revision))

    async def _reclaim(self, partition: int) -> None:
        """Take back a lease of ours that lapsed while the bucket was away, if nobody took it since.

        The compare-and-set on the revision we last wrote succeeds only if no one created or
        renewed the lease in between; if the server aged our entry out meanwhile, a create
        takes it. Both are as safe as any acquisition. Waiting for the view instead cost a
        whole TTL after the bucket came back (a rebuilt view counts every entry it reads as
        fresh, since it cannot know when the server stored it): with the election before it,
        that made a stream leader's kill -9 silence output for 10 s or more.
        """
        key = _LEASE + str(partition)
        last = self._lapsed[partition]
        seen = self._seen.get(key)
        if seen is not None and seen.value == self.name:
            last = max(last, seen.revision)  # our own renewal whose ack never came back
        sent = self.clock()
        try:
            revision = await self._bounded(self.kv.update(key, self.name.encode(), last=last))
        except nats.js.errors.KeyWrongLastSequenceError:
            self._lapsed.pop(partition, None)  # aged out (create takes it) or someone else's (create fails)
            await self._acquire(partition)
            return
        except NATS_ERRORS:
            return  # the bucket is still away: next round
        self._lapsed.pop(partition, None)
        self._held[partition] = _Held(revision, revision, sent + self.ttl_s * (1 - _MARGIN))
        self._notify(LeaseEvent("acquired", partition, revision))

    async def _release(self, partition: int) -> None:
        """Stop counting the lease first, then delete it at its revision so a successor can create it.

        A renewal cut short (its ack timed out, or ``stop`` cancelled it in flight) may still have
        landed, leaving our revision stale: then the lease is read back and, if it is still ours,
        deleted at the revision it has. Otherwise successors would wait out the whole TTL.
        """
        held = self._drop(partition, "released")
        if held is None:
            return
        key = _LEASE + str(partition)
        with contextlib.suppress(*NATS_ERRORS):
            try:
                await self._bounded(self.kv.delete(key, last=held.revision))
            except nats.js.errors.BadRequestError as error:
                if error.err_code not in _WRONG_REVISION:
                    raise
                entry = await self._bounded(self.kv.get(key))
                if entry.value == self.name.encode() and entry.revision is not None:
                    await self._bounded(self.kv.delete(key, last=entry.revision))

    async def _bounded(self, operation: Awaitable[_T]) -> _T:
        """A lease operation may take at most one heartbeat interval: a round must not outlive a lease."""
        return await asyncio.wait_for(operation, min(self.interval_s, _ATTEMPT_S))

    def _drop(self, partition: int, kind: Literal["released", "lost"]) -> _Held | None:
        held = self._held.pop(partition, None)
        if held is not None:
            self._notify(LeaseEvent(kind, partition, held.token))
        return held

    def _notify(self, event: LeaseEvent) -> None:
        self.changes += 1
        if self.on_change is not None:
            self.on_change(event)

    # the view of the bucket -----------------------------------------------------------------
    async def _follow(self, first: KeyValue.Entry | None) -> None:
        """Keep ``_seen`` current from the bucket's watcher; wake a round when something changed.

        Our own heartbeat lands in the bucket every interval, so a watcher silent for one and a
        half intervals has lost its consumer with the server that held it. nats-py's ordered
        consumer notices that only after two of its fixed 5 s heartbeats and retries at that pace,
        slower than a short lease lapses, so the watcher is recreated here instead.
        """
        entry = first
        while True:
            if entry is not None and self._on_entry(entry):
                self._wakeup.set()
            assert self._watcher is not None
            try:
                entry = await _next_update(self._watcher, timeout=1.5 * self.interval_s + _RETRY_S)
            except nats.errors.TimeoutError:
                entry = await self._rewatch()

    async def _rewatch(self) -> KeyValue.Entry | None:
        """A new watcher and a view rebuilt from scratch: until it has settled, no round acts on it."""
        if self._watcher is not None:
            with contextlib.suppress(*NATS_ERRORS):
                await self._bounded(self._watcher.stop())  # type: ignore[no-untyped-call]  # untyped in nats-py
        while True:
            try:
                self._watcher = await self._bounded(self.kv.watchall())
                break
            except NATS_ERRORS:
                await asyncio.sleep(0.2)  # the bucket's stream is electing a leader
        self._seen.clear()
        self._view_since = self.clock()
        return None

    def _on_entry(self, entry: KeyValue.Entry) -> bool:
        """Record an entry; True when ownership or membership changed, not for a mere renewal."""
        if entry.operation in (KV_DEL, KV_PURGE) or entry.value is None:
            return self._seen.pop(entry.key, None) is not None
        before = self._seen.get(entry.key)
        value = entry.value.decode()
        self._seen[entry.key] = _Seen(value, entry.revision or 0, self.clock())
        return before is None or before.value != value or not self._alive(before)

    def _alive(self, seen: _Seen) -> bool:
        return self.clock() < seen.received + self.ttl_s

    def _live_members(self) -> list[str]:
        members = {s.value for k, s in self._seen.items() if k.startswith(_MEMBER) and self._alive(s)}
        return sorted(members | {self.name})

    def _current_owners(self) -> dict[int, str]:
        owners = {p: self.name for p in self.owned()}
        for key, seen in self._seen.items():
            if key.startswith(_LEASE) and self._alive(seen):
                owners.setdefault(int(key[len(_LEASE) :]), seen.value)
        return owners

    def _is_free(self, partition: int) -> bool:
        seen = self._seen.get(_LEASE + str(partition))
        return seen is None or not self._alive(seen)
