"""Child processes as objects, and the policy that decides when a dead one comes back.

:class:`ChildProcess` owns one ``spawn``-context process and its control pipe, so the
supervisor only holds policy. :class:`RestartPolicy` takes its clock as an argument so that
tests can drive time; the supervisor's loop asks it *when*, and never sleeps.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from typing import Any

from streamd.control import Control


class ChildProcess:
    """One ingest or worker process; a dead worker is replaced by a new ChildProcess in its slot."""

    def __init__(self, mp: SpawnContext, role: str, index: int, target: Callable[..., None], args: tuple[Any, ...]):
        self.role = role
        self.index = index
        self.ready = False
        parent_end, child_end = mp.Pipe()
        self.conn: Connection = parent_end
        self.process = mp.Process(target=target, args=(*args, child_end), name=f"streamd-{role}-{index}")
        self._child_end = child_end

    @property
    def name(self) -> str:
        return f"{self.role} {self.index}"

    @property
    def label(self) -> str:
        """The ``worker`` label of per-process metrics."""
        return str(self.index)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def start(self) -> None:
        """Start the process with SIGINT ignored, so a Ctrl-C while it imports is not a traceback.

        The disposition survives exec; the child keeps ignoring SIGINT (the supervisor decides
        when children stop) and Python installs no KeyboardInterrupt handler in it.
        """
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.process.start()
        finally:
            signal.signal(signal.SIGINT, previous)
        self._child_end.close()

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def send(self, message: Control) -> bool:
        """Send a control message; False if the child is gone."""
        try:
            self.conn.send(message)
        except (OSError, ValueError):
            return False
        return True

    def receive(self) -> Control | None:
        """The next control message, or None once the child has closed its end (it exited)."""
        try:
            message: Control = self.conn.recv()
        except (EOFError, OSError):
            self.conn.close()
            return None
        return message

    def join(self, timeout: float) -> None:
        self.process.join(max(0.0, timeout))

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(2)
        self.conn.close()


class RestartPolicy:
    """Backoff between restarts of one slot: immediate after a healthy run, doubling while it keeps dying.

    A child that ran at least ``stable_after`` seconds resets the backoff, so a worker killed
    once a day is always replaced at once, while a crash loop settles at one start per
    ``maximum`` seconds.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        initial: float = 0.1,
        maximum: float = 5.0,
        stable_after: float = 30.0,
    ) -> None:
        self._clock = clock
        self._initial = initial
        self._maximum = maximum
        self._stable_after = stable_after
        self._failures = 0
        self._started_at = clock()

    def started(self) -> None:
        self._started_at = self._clock()

    def died(self) -> float:
        """Record a death; return the clock time at which the replacement may start."""
        now = self._clock()
        if now - self._started_at >= self._stable_after:
            self._failures = 0
        delay = 0.0 if self._failures == 0 else min(self._maximum, self._initial * 2 ** (self._failures - 1))
        self._failures += 1
        return now + delay
