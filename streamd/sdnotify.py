"""The sd_notify protocol: tell systemd about readiness, reloads, shutdown and liveness.

Under ``Type=notify`` systemd passes the path of a unix datagram socket in ``$NOTIFY_SOCKET``
(a leading ``@`` means the Linux abstract namespace) and waits for ``READY=1`` before it
considers the service started, so ``systemctl start`` returns only once the metrics endpoint
and the sockets are up. With ``WatchdogSec=`` it also sets ``$WATCHDOG_USEC`` and kills the
service if ``WATCHDOG=1`` does not arrive in time, which catches a wedged supervisor loop
that a plain ``Restart=on-failure`` never would.

This is the whole protocol in a few lines rather than a dependency on libsystemd: outside
systemd (no ``$NOTIFY_SOCKET``) every call is a no-op, so the daemon runs the same in a
terminal, in tests and in containers.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping
from types import TracebackType
from typing import Self

log = logging.getLogger("streamd.sdnotify")


def _socket_address(value: str) -> str:
    """systemd writes abstract socket names with a leading ``@``; the kernel wants a NUL byte."""
    return "\0" + value[1:] if value.startswith("@") else value


class Notifier:
    """Sends sd_notify state changes from the service's main process.

    Only the main process should notify (the unit sets ``NotifyAccess=main``); pass
    ``unset_environment=True`` so that worker processes spawned later do not inherit
    ``NOTIFY_SOCKET`` and ``WATCHDOG_*`` and believe they are the service.

    Sending never raises: a lost notification must not take the daemon down. Each method
    returns whether the datagram was handed to the kernel.
    """

    def __init__(
        self,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
    ) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(address) if address else None
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._socket: socket.socket | None = None
        self._warned = False
        if unset_environment:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(name, None)

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens for notifications."""
        return self._address is not None

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) finished: systemd marks the unit active."""
        return self._send("READY=1", status)

    def reloading(self, status: str | None = None) -> bool:
        """A reload started; send :meth:`ready` when it is done, whatever its outcome.

        ``MONOTONIC_USEC`` lets systemd 253+ (``Type=notify-reload``) match this message to
        the reload it requested; older versions ignore the field.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000
        return self._send(f"RELOADING=1\nMONOTONIC_USEC={now_usec}", status)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown started: systemd shows the unit as deactivating while we drain."""
        return self._send("STOPPING=1", status)

    def status(self, text: str) -> bool:
        """One line shown by ``systemctl status`` (e.g. workers alive, ticks per second)."""
        return self._send(None, text)

    def watchdog(self) -> bool:
        """Liveness ping; call every :meth:`watchdog_interval` seconds from the main loop."""
        return self._send("WATCHDOG=1", None)

    def watchdog_interval(self) -> float | None:
        """Seconds between :meth:`watchdog` pings, or None when no watchdog is armed for us.

        This is half of ``$WATCHDOG_USEC`` (as sd_watchdog_enabled(3) recommends), so one late
        ping never trips the watchdog. ``$WATCHDOG_PID``, when set, names the one process the
        watchdog is meant for; any other process gets None.
        """
        if self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2_000_000

    def close(self) -> None:
        """Close the datagram socket (the next notification opens a new one)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, state: str | None, status: str | None) -> bool:
        if self._address is None:
            return False
        lines = [] if state is None else [state]
        if status is not None:
            # One datagram is a list of KEY=VALUE lines: a newline inside STATUS would start a new key.
            lines.append("STATUS=" + " ".join(status.splitlines()))
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify failed", extra={"error": str(exc), "socket": self._address})
                self._warned = True
            return False
        return True
