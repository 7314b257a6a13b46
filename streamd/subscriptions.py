"""What the subscribers want: topic prefixes, as a worker's XPUB socket hears of them.

A worker's XPUB socket connects to the supervisor's forwarder, whose XSUB side passes on every
subscription its subscribers make (and replays them all to a worker that connects later). A
PUB socket drops a record no subscriber wants only once it has been named, encoded and sent
from Python; knowing the prefixes, a publisher skips those rows before any of that work. Under a
flood of new keys nobody subscribed to, that work was most of a worker's time.
"""

from __future__ import annotations

_SUBSCRIBE, _UNSUBSCRIBE = 1, 0


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
