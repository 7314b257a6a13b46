"""A C-level XSUB -> XPUB proxy in a thread of its own, stoppable from the owning thread.

The supervisor's forwarder (workers -> the publish endpoint) and ``streamd gateway`` (instances
-> one endpoint) are both this; they differ only in how their two sockets are bound or connected.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import zmq


class SteerableProxy:
    """``zmq.proxy_steerable(xsub, xpub)`` run in a daemon thread; :meth:`stop` ends it with TERMINATE."""

    def __init__(self, ctx: zmq.Context[Any], xsub: zmq.Socket[Any], xpub: zmq.Socket[Any], name: str) -> None:
        self._xsub = xsub
        self._xpub = xpub
        address = f"inproc://{name}-control-{id(self)}"
        self._control = ctx.socket(zmq.PAIR)
        self._control.bind(address)
        self._steer = ctx.socket(zmq.PAIR)
        self._steer.connect(address)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(zmq.ContextTerminated):
            zmq.proxy_steerable(self._xsub, self._xpub, None, self._control)

    def stop(self) -> None:
        """End the proxy thread (if it ran) and close its control sockets; the two proxied sockets stay open."""
        if self._thread.is_alive():
            self._steer.send(b"TERMINATE")
            self._thread.join(timeout=5)
        self._control.close(0)
        self._steer.close(0)
