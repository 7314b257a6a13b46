"""CURVE on the public sockets: keys on a socket, a ZAP handler, and every refused handshake counted.

With ``[security]``, every ingest socket and the supervisor's publish socket use ZeroMQ's
CURVE. Each process that binds a CURVE server socket (a pull-mode ingest, the supervisor)
runs one :class:`CurveGuard` thread, which

* answers ZeroMQ's ZAP requests (``inproc://zeromq.zap.01``, one handler per context) from
  the authorized public keys, logging refused keys (rate-limited);
* reads the socket's monitor, and counts every failed handshake in
  ``streamd_auth_failures_total{endpoint}``. A client without CURVE, or with the wrong server
  key, fails before ZAP is asked, so the ZAP handler alone would miss it; the monitor's
  handshake-failure events cover every case, each once.

In sub mode streamd is the CURVE *client* of the feed: there is nothing to authorize, but the
guard still counts and logs handshakes the feed refuses. Internal ipc sockets stay NULL: no
ZAP domain is set on them, so libzmq never asks the handler about them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from streamd.config import Config, SecurityConfig
from streamd.keys import KeyFileError, read_authorized_keys, read_keypair, read_public_key
from streamd.logs import RateLimiter
from streamd.metrics import AuthMetrics
from streamd.runtime import StartupError

EndpointKind = Literal["ingest", "publish"]
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_ZAP_VERSION = b"1.0"
# A client without CURVE is refused with a protocol error, or, when it notices the mismatch
# first and hangs up, with a failure "without detail": both are counted.
_HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_POLL_MS = 200  # how soon stop() is noticed; the thread sleeps in poll otherwise
_MISMATCH = int(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH)
_CRYPTOGRAPHIC = int(zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC)
_PROTOCOL_PROBLEMS = {
    _MISMATCH: "the peer does not use CURVE",
    _CRYPTOGRAPHIC: "the client does not have this server's public key",
}
_FEED_PROBLEMS = {
    _MISMATCH: "the feed does not use CURVE",
    _CRYPTOGRAPHIC: "security.curve_feed_public_key is not the feed's public key",
}


@dataclass(frozen=True)
class ZapVerdict:
    """The reply to one ZAP request, and who asked (for the log)."""

    reply: list[bytes]
    allowed: bool
    client_key: str  # Z85 public key, "" when the request carried none
    address: str


def zap_verdict(request: list[bytes], authorized: frozenset[bytes]) -> ZapVerdict:
    """Answer a ZAP request (RFC 27): 200 for a CURVE client whose public key is authorized, else 400.

    A malformed request is refused too: the handler never lets a handshake through by default.
    """
    request_id = request[1] if len(request) > 1 else b""
    address = request[3].decode("utf-8", "replace") if len(request) > 3 else ""
    if len(request) != 7 or request[0] != _ZAP_VERSION or request[5] != b"CURVE" or len(request[6]) != 32:
        return ZapVerdict([_ZAP_VERSION, request_id, b"400", b"not a CURVE request", b"", b""], False, "", address)
    key = z85.encode(request[6])
    if key in authorized:
        return ZapVerdict([_ZAP_VERSION, request_id, b"200", b"OK", key, b""], True, key.decode(), address)
    return ZapVerdict([_ZAP_VERSION, request_id, b"400", b"key not authorized", b"", b""], False, key.decode(), address)


def _load(read: Callable[[str], Any], path: str, key: str) -> Any:
    """Read a key file at start-up; it passed at load, so a failure now is a start-up error."""
    try:
        return read(path)
    except KeyFileError as exc:
        msg = f"{key}: {exc}"
        raise StartupError(msg) from None


class CurveGuard:
    """The thread beside one CURVE socket: ZAP answers (server side) and handshake-failure accounting."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        sock: zmq.Socket[Any],
        kind: EndpointKind,
        log: logging.Logger,
        rate_limit_per_s: float,
        authorized_dir: str | None,
    ) -> None:
        self.kind = kind
        self.log = log
        self.limited = RateLimiter(log, rate_limit_per_s)
        self.metrics = AuthMetrics(registry=None)
        self.failures = self.metrics.failures.labels(kind)
        self.authorized_dir = authorized_dir
        self.authorized: frozenset[bytes] = frozenset()
        self.zap: zmq.Socket[Any] | None = None
        if authorized_dir is not None:
            self.authorized = _load(read_authorized_keys, authorized_dir, "security.curve_authorized_keys")
            self.zap = ctx.socket(zmq.REP)
            self.zap.setsockopt(zmq.LINGER, 0)
            self.zap.bind(ZAP_ENDPOINT)
        monitor_endpoint = f"inproc://curve-monitor-{id(self)}"
        sock.monitor(monitor_endpoint, _HANDSHAKE_FAILURES)
        self.events = ctx.socket(zmq.PAIR)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.connect(monitor_endpoint)
        if authorized_dir is None:
            log.info("CURVE on, as the feed's client", extra={"endpoint": kind})
        else:
            log.info("CURVE on", extra={"endpoint": kind, "authorized_keys": len(self.authorized)})
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"curve-{kind}", daemon=True)
        self._thread.start()

    def reload(self) -> None:
        """Re-read the authorized keys (SIGHUP); a directory that no longer reads keeps the old set."""
        if self.authorized_dir is None:
            return
        try:
            keys = read_authorized_keys(self.authorized_dir)
        except KeyFileError as exc:
            self.log.error("authorized keys not reloaded, keeping the old set", extra={"error": str(exc)})
            return
        self.authorized = keys
        self.log.info("authorized keys reloaded", extra={"endpoint": self.kind, "keys": len(keys)})

    def stop(self) -> None:
        """End the thread; it closes its own sockets. (A terminated context ends it too.)"""
        self._stopping.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.events, zmq.POLLIN)
        if self.zap is not None:
            poller.register(self.zap, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                for sock, _ in poller.poll(_POLL_MS):
                    if sock is self.events:
                        self._on_event(self.events.recv_multipart())
                    else:
                        self._answer(sock)
        except zmq.ContextTerminated:
            pass
        finally:
            self.events.close(0)
            if self.zap is not None:
                self.zap.close(0)

    def _answer(self, zap: zmq.Socket[Any]) -> None:
        verdict = zap_verdict(zap.recv_multipart(), self.authorized)
        zap.send_multipart(verdict.reply)
        if not verdict.allowed:
            self.limited.warning(
                "auth_refused",
                "CURVE client refused: its public key is not authorized",
                endpoint=self.kind,
                client_key=verdict.client_key,
                peer=verdict.address,
            )

    def _on_event(self, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)
        if not event["event"] & _HANDSHAKE_FAILURES:
            return
        self.failures.inc()
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            if self.zap is None:
                self.limited.warning(
                    "auth_refused",
                    "the feed refused streamd's CURVE key (add streamd's public key to the feed's authorized keys)",
                    endpoint=self.kind,
                    status=event["value"],
                )
            return
        problems = _PROTOCOL_PROBLEMS if self.zap is not None else _FEED_PROBLEMS
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            problem = f"the peer hung up during the handshake ({os.strerror(event['value'])}; not a CURVE peer?)"
        else:
            problem = problems.get(int(event["value"]), f"protocol error 0x{event['value']:x}")
        self.limited.warning("auth_handshake", f"CURVE handshake failed: {problem}", endpoint=self.kind)


def serve_curve(
    ctx: zmq.Context[Any],
    sock: zmq.Socket[Any],
    security: SecurityConfig,
    kind: EndpointKind,
    log: logging.Logger,
    rate_limit_per_s: float,
) -> CurveGuard:
    """Make ``sock`` a CURVE server admitting only the authorized keys; call before it binds."""
    public, secret = _load(read_keypair, security.curve_secret_key, "security.curve_secret_key")
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    return CurveGuard(ctx, sock, kind, log, rate_limit_per_s, security.curve_authorized_keys)


def connect_curve(
    ctx: zmq.Context[Any],
    sock: zmq.Socket[Any],
    security: SecurityConfig,
    log: logging.Logger,
    rate_limit_per_s: float,
) -> CurveGuard:
    """Make ``sock`` a CURVE client of the feed (sub mode), with streamd's keypair; call before it connects."""
    assert security.curve_feed_public_key is not None  # the config requires it in sub mode
    public, secret = _load(read_keypair, security.curve_secret_key, "security.curve_secret_key")
    feed = _load(read_public_key, security.curve_feed_public_key, "security.curve_feed_public_key")
    sock.setsockopt(zmq.CURVE_SERVERKEY, feed)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    return CurveGuard(ctx, sock, "ingest", log, rate_limit_per_s, None)


def secure_input(
    ctx: zmq.Context[Any], sock: zmq.Socket[Any], config: Config, log: logging.Logger
) -> CurveGuard | None:
    """CURVE on an ingest socket per ``[security]`` (None: none): server in pull mode, the feed's client in sub mode."""
    if config.security is None:
        return None
    rate = config.log.rate_limit_per_s
    if config.ingest.mode == "sub":
        return connect_curve(ctx, sock, config.security, log, rate)
    return serve_curve(ctx, sock, config.security, "ingest", log, rate)


def secure_publish(
    ctx: zmq.Context[Any], sock: zmq.Socket[Any], config: Config, log: logging.Logger
) -> CurveGuard | None:
    """CURVE on the publish socket per ``[security]`` (None: none); call before it binds."""
    if config.security is None:
        return None
    return serve_curve(ctx, sock, config.security, "publish", log, config.log.rate_limit_per_s)
