"""The daemon speaks sd_notify to a real unix datagram socket, as systemd would listen."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack

from tests.helpers import daemon_config, feed, free_port, make_ticks, stop_process


class NotifySocket:
    """What systemd does for Type=notify: a datagram socket whose path is in NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def wait_for(self, needle: str, timeout: float = 30.0, occurrences: int = 1) -> str:
        """The ``occurrences``-th message containing ``needle``, receiving until it arrives."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [message for message in self.messages if needle in message]
            if len(found) >= occurrences:
                return found[occurrences - 1]
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
        msg = f"fewer than {occurrences} {needle!r} among {self.messages}"
        raise AssertionError(msg)

    def close(self) -> None:
        self.sock.close()


def test_ready_status_watchdog_reload_and_stopping(tmp_path: Path) -> None:
    """READY=1 after every worker is up; STATUS and WATCHDOG while healthy; RELOADING/READY on HUP; STOPPING."""
    notify = NotifySocket(tmp_path / "notify.sock")
    ingest = f"tcp://127.0.0.1:{free_port()}"
    config = tmp_path / "streamd.toml"
    config.write_text(daemon_config(ingest, f"tcp://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", 2, ""))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    log = (tmp_path / "log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamd", "run", "--config", str(config)], env=env, stderr=log)
    try:
        notify.wait_for("READY=1")
        text = (tmp_path / "log").read_text()
        assert text.count("worker started") == 2, "READY=1 came before every worker was up"
        feed(ingest, [msgpack.packb(make_ticks(500))])
        notify.wait_for("WATCHDOG=1")
        status = notify.wait_for("STATUS=")
        assert "ticks/s" in status and "2/2 workers up" in status
        proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING=1")
        assert "MONOTONIC_USEC=" in reloading
        notify.wait_for("READY=1", occurrences=2)
        assert notify.messages.index(reloading) < max(i for i, m in enumerate(notify.messages) if "READY=1" in m)
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert proc.wait(10) == 0
    finally:
        stop_process(proc)
        log.close()
        notify.close()
