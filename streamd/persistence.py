"""Checkpoint files on disk (``state.dir``): atomic writes off the worker's thread, and what a
starting worker loads.

One file per worker, named for the worker and the worker count (``worker-1-of-4.ckpt``), so
that a daemon restarted with another count can still find every key: it re-shards them. A
file is written whole to a temporary name, fsynced, renamed over the old one and the directory
fsynced: a crash at any point leaves the previous checkpoint or the new one, never a mix.
Encoding, CRC and writing run on a background thread from a copy of the state (the copy, a
memcpy per table, is all the worker's loop pays), so a checkpoint does not stall the worker.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from streamd.checkpoint import Checkpoint, CheckpointError, decode, encode
from streamd.sharding import shard_for
from streamd.windows import EngineState

_NAME = re.compile(r"^worker-(\d+)-of-(\d+)\.ckpt$")


def checkpoint_path(directory: str, worker: int, workers: int) -> Path:
    return Path(directory) / f"worker-{worker}-of-{workers}.ckpt"


def write_atomically(path: Path, pieces: list[bytes | memoryview]) -> int:
    """Write ``pieces`` to ``path`` so that a crash leaves the old file or the new one; return the bytes."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    size = 0
    with temporary.open("wb") as file:
        for piece in pieces:
            size += file.write(piece)
        file.flush()
        os.fsync(file.fileno())
    temporary.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return size


@dataclass(frozen=True)
class Written:
    """A checkpoint that reached the disk, and what it cost."""

    checkpoint: Checkpoint
    bytes: int
    seconds: float


class CheckpointWriter:
    """Writes one checkpoint at a time on a background thread; the worker submits and goes on.

    ``on_written`` runs on that thread once a file is durable (the worker then tells the ingests,
    through the ledger, that they may forget what it holds); ``on_failed`` when it is not.
    """

    def __init__(self, on_written: Callable[[Written], None], on_failed: Callable[[Path, OSError], None]) -> None:
        self._on_written = on_written
        self._on_failed = on_failed
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, path: Path, checkpoint: Checkpoint) -> bool:
        """Start writing ``checkpoint``; False (nothing done) while the previous one is still being written."""
        if self.busy:
            return False
        self._thread = threading.Thread(target=self.write, args=(path, checkpoint), name="checkpoint", daemon=True)
        self._thread.start()
        return True

    def write(self, path: Path, checkpoint: Checkpoint) -> None:
        """Encode and write on the calling thread (the final checkpoint at shutdown)."""
        started = time.perf_counter()
        try:
            size = write_atomically(path, encode(checkpoint))
        except OSError as exc:
            self._on_failed(path, exc)
            return
        self._on_written(Written(checkpoint, size, time.perf_counter() - started))

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()


@dataclass(frozen=True)
class Restored:
    """What a starting worker takes over: keys in their new local order, and the state rows of each."""

    keys: list[str | int]
    parts: list[tuple[EngineState, np.ndarray]]
    sources: list[Checkpoint]
    applied: tuple[int, ...] | None  # sequence numbers to resume from (same run, same worker): else None

    @property
    def newest(self) -> Checkpoint:
        return max(self.sources, key=lambda source: source.wall_ns)


def _layouts(directory: Path) -> dict[int, dict[int, Path]]:
    """Checkpoint files by worker count, then worker index."""
    found: dict[int, dict[int, Path]] = {}
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            worker, workers = int(match[1]), int(match[2])
            if worker < workers:
                found.setdefault(workers, {})[worker] = path
    return found


def load_for_worker(directory: str, worker: int, workers: int, run_id: str, log: logging.Logger) -> Restored | None:
    """The checkpoint(s) worker ``worker`` of ``workers`` resumes from, or None (start empty).

    Its own file when the newest checkpoints were written by as many workers; otherwise every
    file of the newest worker count, keeping the keys that :func:`shard_for` now gives to this
    worker. An unreadable or mismatched file is logged and skipped, never loaded silently.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    layouts = _layouts(path)
    if not layouts:
        return None
    newest = max(layouts, key=lambda count: max(p.stat().st_mtime_ns for p in layouts[count].values()))
    if newest == workers:
        files = [layouts[workers][worker]] if worker in layouts[workers] else []
    else:
        files = [layouts[newest][index] for index in sorted(layouts[newest])]
        log.warning(
            "worker count changed since the last checkpoints: re-sharding their keys",
            extra={"worker": worker, "checkpoint_workers": newest, "workers": workers},
        )
    sources = [checkpoint for file in files if (checkpoint := _read(file, log)) is not None]
    if not sources:
        return None
    keys: list[str | int] = []
    parts = []
    for source in sources:
        if newest == workers:
            rows = np.arange(len(source.keys), dtype=np.int64)
        else:
            rows = np.array(
                [i for i, key in enumerate(source.keys) if key is not None and shard_for(key, workers) == worker],
                np.int64,
            )
        keys.extend(source.keys[i] for i in rows.tolist())
        parts.append((source.state, rows))
    own = sources[0] if newest == workers else None
    applied = own.applied if own is not None and own.run_id == run_id else None
    return Restored(keys, parts, sources, applied)


def _read(file: Path, log: logging.Logger) -> Checkpoint | None:
    try:
        checkpoint = decode(file.read_bytes())
    except (OSError, CheckpointError) as exc:
        log.error("checkpoint not loaded: its windows start empty", extra={"path": str(file), "error": str(exc)})
        return None
    match = _NAME.match(file.name)
    assert match is not None
    if (checkpoint.worker, checkpoint.workers) != (int(match[1]), int(match[2])):
        log.error(
            "checkpoint not loaded: it names another worker than its file",
            extra={"path": str(file), "worker": checkpoint.worker, "workers": checkpoint.workers},
        )
        return None
    return checkpoint


def iso(nanos: int) -> str:
    """A wall-clock time in nanoseconds as ISO 8601 UTC (for log lines)."""
    return datetime.fromtimestamp(nanos / 1e9, UTC).isoformat(timespec="milliseconds")
