"""``streamd gateway``: every cluster instance's signals on one ZeroMQ endpoint, holding no state.

Each instance publishes the signals of the partitions it owns on its own ``publish.endpoint``.
The gateway connects an XSUB socket to all of them (``[gateway] upstreams``) and binds one
XPUB socket (``[gateway] endpoint``); ``zmq.proxy_steerable`` moves messages between the two in
C, and subscriptions flow back upstream, so an instance only sends what somebody asked for.
When ownership of a partition moves, its signals simply start arriving from another upstream:
subscribers keep one connection. A gateway can be restarted, or run twice behind a load
balancer, at no cost, since it remembers nothing.

Signal handlers only record; the main thread acts on them and stops the proxy thread.
"""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Any

import zmq

from streamd.config import Config, GatewayConfig
from streamd.logs import setup_logging
from streamd.proxy import SteerableProxy
from streamd.runtime import StartupError

READY_LINE = "streamd gateway ready"


class Gateway:
    """XSUB connected to every upstream -> XPUB bound on the endpoint, proxied in a C-level thread."""

    def __init__(self, config: GatewayConfig, ctx: zmq.Context[Any]) -> None:
        self.config = config
        self.ctx = ctx
        self.xsub = ctx.socket(zmq.XSUB)
        self.xpub = ctx.socket(zmq.XPUB)
        for sock in (self.xsub, self.xpub):
            sock.setsockopt(zmq.LINGER, 0)
        self.xsub.setsockopt(zmq.RCVHWM, config.sndhwm)
        self.xpub.setsockopt(zmq.SNDHWM, config.sndhwm)
        self._proxy = SteerableProxy(ctx, self.xsub, self.xpub, "gateway-proxy")

    def start(self) -> None:
        try:
            self.xpub.bind(self.config.endpoint)
        except zmq.ZMQError as exc:
            msg = f"gateway.endpoint: cannot bind {self.config.endpoint}: {zmq.strerror(exc.errno or 0)}"
            raise StartupError(msg) from None
        for i, upstream in enumerate(self.config.upstreams):
            try:
                self.xsub.connect(upstream)
            except zmq.ZMQError as exc:
                msg = f"gateway.upstreams[{i}]: cannot connect to {upstream}: {zmq.strerror(exc.errno or 0)}"
                raise StartupError(msg) from None
        self._proxy.start()

    def stop(self) -> None:
        self._proxy.stop()
        self.xsub.close(0)
        self.xpub.close(0)


def run_gateway(config: Config) -> int:
    """Run until SIGTERM or SIGINT; the exit code."""
    if config.gateway is None:
        msg = f"{config.source}: no [gateway] section (needs at least gateway.upstreams)"
        raise StartupError(msg)
    log = setup_logging(config.log, "gateway")
    received: list[int] = []

    def record(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGTERM, signal.SIGINT)}
    ctx: zmq.Context[Any] = zmq.Context()
    gateway = Gateway(config.gateway, ctx)
    try:
        gateway.start()
        log.info(
            READY_LINE,
            extra={"endpoint": config.gateway.endpoint, "upstreams": ",".join(config.gateway.upstreams)},
        )
        while not received:
            time.sleep(0.1)
        log.info("stopping", extra={"signal": signal.Signals(received[0]).name})
    finally:
        gateway.stop()
        ctx.term()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("streamd gateway stopped")
    return 0
