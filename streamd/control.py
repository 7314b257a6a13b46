"""The control channel between the supervisor and its children: one dataclass per message.

Children and the supervisor talk over a ``multiprocessing`` pipe; these are the only things
that travel on it. Ticks never do: they move on ZeroMQ sockets (:mod:`streamd.transport`).
"""

from __future__ import annotations

from dataclasses import dataclass

from streamd.config import Config


@dataclass(frozen=True)
class Ready:
    """child -> supervisor: sockets are bound, the child is serving."""


@dataclass(frozen=True)
class Failed:
    """child -> supervisor: the child cannot run (a user error such as a port in use)."""

    error: str


@dataclass(frozen=True)
class Stop:
    """supervisor -> child: stop intake (ingest) or stop after draining (worker)."""


@dataclass(frozen=True)
class Reload:
    """supervisor -> child: apply a reloaded configuration (signals, batching, logging)."""

    config: Config


@dataclass(frozen=True)
class WorkerLost:
    """supervisor -> ingest: ``worker`` died; its replacement will run as ``generation``."""

    worker: int
    generation: int


@dataclass(frozen=True)
class WorkerReset:
    """ingest -> supervisor: the ingest wrote off what died with ``worker`` and is ready for it."""

    worker: int
    lost_ticks: int


@dataclass(frozen=True)
class CheckpointNow:
    """supervisor -> worker: an ingest died, and with it the replay journal of what it had handed
    over since this worker's last checkpoint; write one now rather than at the next interval."""


Control = Ready | Failed | Stop | Reload | WorkerLost | WorkerReset | CheckpointNow
