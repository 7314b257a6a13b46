"""sd_notify: the exact datagrams systemd receives, on a real unix datagram socket."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamd.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket standing in for systemd, named by ``$NOTIFY_SOCKET``."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


class TestMessages:
    def test_ready(self, listener: socket.socket) -> None:
        """ready() sends exactly READY=1."""
        with Notifier() as notifier:
            assert notifier.ready()
        assert receive(listener) == "READY=1"

    def test_ready_with_status(self, listener: socket.socket) -> None:
        """A status rides in the same datagram as the state change."""
        with Notifier() as notifier:
            notifier.ready("serving, 4 workers")
        assert receive(listener) == "READY=1\nSTATUS=serving, 4 workers"

    def test_stopping(self, listener: socket.socket) -> None:
        """stopping() sends exactly STOPPING=1."""
        with Notifier() as notifier:
            notifier.stopping()
        assert receive(listener) == "STOPPING=1"

    def test_watchdog(self, listener: socket.socket) -> None:
        """watchdog() sends exactly WATCHDOG=1."""
        with Notifier() as notifier:
            notifier.watchdog()
        assert receive(listener) == "WATCHDOG=1"

    def test_status_is_one_line(self, listener: socket.socket) -> None:
        """A newline inside the status cannot inject another KEY=VALUE line."""
        with Notifier() as notifier:
            notifier.status("workers 4/4\nREADY=1")
        assert receive(listener) == "STATUS=workers 4/4 READY=1"

    def test_reloading_carries_monotonic_usec(self, listener: socket.socket) -> None:
        """RELOADING=1 comes with the CLOCK_MONOTONIC time of the reload, in microseconds."""
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000
        with Notifier() as notifier:
            notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000
        first, second = receive(listener).split("\n")
        assert first == "RELOADING=1"
        name, _, value = second.partition("=")
        assert name == "MONOTONIC_USEC"
        assert before <= int(value) <= after

    def test_sequence_arrives_in_order(self, listener: socket.socket) -> None:
        """One socket is reused for every message and datagrams keep their order."""
        with Notifier() as notifier:
            notifier.ready()
            notifier.watchdog()
            notifier.stopping()
        assert [receive(listener) for _ in range(3)] == ["READY=1", "WATCHDOG=1", "STOPPING=1"]


class TestAddresses:
    def test_abstract_namespace(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A leading @ names a socket in the abstract namespace (no file on disk)."""
        name = f"streamd-test-{os.getpid()}-{time.monotonic_ns()}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind("\0" + name)
            sock.settimeout(5)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
            with Notifier() as notifier:
                assert notifier.enabled
                notifier.ready()
            assert receive(sock) == "READY=1"
        finally:
            sock.close()

    def test_unset_is_a_no_op(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Outside systemd every call does nothing and reports that nothing was sent."""
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
        with Notifier() as notifier:
            assert not notifier.enabled
            assert not notifier.ready()
            assert not notifier.reloading()
            assert not notifier.watchdog()

    def test_missing_listener_does_not_raise(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A notification that cannot be delivered is reported, never raised."""
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
        with Notifier() as notifier:
            assert not notifier.ready()
            assert not notifier.stopping()

    def test_unset_environment_hides_socket_from_children(self) -> None:
        """unset_environment removes NOTIFY_SOCKET and WATCHDOG_* from the environment given."""
        environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1", "X": "y"}
        notifier = Notifier(environ, unset_environment=True)
        assert notifier.enabled
        assert environ == {"X": "y"}


class TestWatchdog:
    def test_half_of_watchdog_usec(self) -> None:
        """The ping interval is half the watchdog timeout, in seconds."""
        assert Notifier({"WATCHDOG_USEC": "20000000"}).watchdog_interval() == 10.0

    def test_not_armed(self) -> None:
        """No WATCHDOG_USEC means no watchdog."""
        assert Notifier({}).watchdog_interval() is None

    def test_pid_matches(self) -> None:
        """WATCHDOG_PID naming this process arms the watchdog."""
        environ = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
        assert Notifier(environ).watchdog_interval() == 1.5

    def test_pid_of_another_process(self) -> None:
        """WATCHDOG_PID naming another process (our parent, say) means it is not ours to ping."""
        environ = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)}
        assert Notifier(environ).watchdog_interval() is None

    @pytest.mark.parametrize("value", ["0", "-5", "soon", ""])
    def test_invalid_usec(self, value: str) -> None:
        """A zero, negative or unparsable timeout disarms rather than crashes."""
        assert Notifier({"WATCHDOG_USEC": value}).watchdog_interval() is None
