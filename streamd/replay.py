"""``streamd replay``: publish ticks from a CSV file (header ``k,t,p,q``) as columnar batches.

With ``--speed X`` (X > 0) batches are paced by event time, X times faster than real
time; with 0 they go out as fast as the socket takes them. Keys are sent as strings.

A line that is not a tick is skipped and counted (the first few are shown with their line
numbers); blank lines are ignored. Ticks are only handed to a connected ingest: if nothing
accepts them for ``SEND_TIMEOUT_S``, replay stops with an error instead of queueing them in
memory and waiting forever.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

SEND_TIMEOUT_S = 5.0
_SHOWN_BAD_LINES = 5
_MAX_T = 2**63


class ReplayError(RuntimeError):
    """The file cannot be replayed, or nothing receives it: one line, exit non-zero."""


Tick = tuple[str, int, float, float]


def parse_row(row: Sequence[str]) -> Tick:
    """One CSV row as ``(k, t, p, q)``; a ValueError says what is wrong with it."""
    if len(row) < 3:
        msg = f"expected k,t,p[,q], got {len(row)} field(s)"
        raise ValueError(msg)
    key, t_text, p_text = row[0], row[1].strip(), row[2].strip()
    q_text = row[3].strip() if len(row) > 3 else ""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        msg = "k is not valid UTF-8"
        raise ValueError(msg) from None
    try:
        t = int(t_text)
    except ValueError:
        msg = f"t={t_text!r} is not an integer (nanoseconds since the epoch)"
        raise ValueError(msg) from None
    if not 0 <= t < _MAX_T:
        msg = f"t={t_text} is outside 0 <= t < 2**63"
        raise ValueError(msg)
    p = _finite(p_text, "p")
    q = _finite(q_text, "q") if q_text else 0.0
    if q < 0:
        msg = f"q={q_text} is negative"
        raise ValueError(msg)
    return key, t, p, q


def _finite(text: str, name: str) -> float:
    try:
        number = float(text)
    except ValueError:
        msg = f"{name}={text!r} is not a number"
        raise ValueError(msg) from None
    if not math.isfinite(number):
        msg = f"{name}={text} is not finite"
        raise ValueError(msg)
    return number


@dataclass
class Progress:
    """A progress bar on one line of stderr; notes are printed above it."""

    total: int
    started: float = field(default_factory=time.monotonic)
    shown: str = ""

    def update(self, sent: int) -> None:
        width = 30
        done = sent / self.total if self.total else 1.0
        rate = sent / max(time.monotonic() - self.started, 1e-9)
        self.shown = f"[{'#' * int(done * width):<{width}}] {done:6.1%} {sent:,}/{self.total:,} ticks {rate:,.0f}/s"
        sys.stderr.write("\r" + self.shown)
        sys.stderr.flush()

    def note(self, text: str) -> None:
        sys.stderr.write(("\r" + " " * len(self.shown) + "\r" if self.shown else "") + text + "\n" + self.shown)
        sys.stderr.flush()

    def finish(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


@dataclass
class BadLines:
    """Lines that were not ticks: counted, the first few shown."""

    path: Path
    progress: Progress
    count: int = 0

    def skip(self, line: int, reason: str) -> None:
        self.count += 1
        if self.count <= _SHOWN_BAD_LINES:
            self.progress.note(f"streamd: warning: {self.path}:{line}: skipped, {reason}")
        if self.count == _SHOWN_BAD_LINES:
            self.progress.note("streamd: warning: further bad lines are counted, not shown")


def _batches(path: Path, size: int, bad: BadLines) -> Iterator[dict[str, list[Any]]]:
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        if [h.strip() for h in header[:3]] != ["k", "t", "p"]:
            msg = f"{path}: first line must be the header k,t,p,q (got {','.join(header)!r})"
            raise ReplayError(msg)
        batch: dict[str, list[Any]] = {"k": [], "t": [], "p": [], "q": []}
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            try:
                tick = parse_row(row)
            except ValueError as exc:
                bad.skip(reader.line_num, str(exc))
                continue
            for column, value in zip(batch.values(), tick, strict=True):
                column.append(value)
            if len(batch["t"]) == size:
                yield batch
                batch = {"k": [], "t": [], "p": [], "q": []}
        if batch["t"]:
            yield batch


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return max(0, sum(1 for _ in handle) - 1)


def replay(file: str, endpoint: str, *, speed: float = 0.0, batch: int = 1000) -> int:
    """Send the file's ticks to ``endpoint``; returns the exit code, raises ReplayError."""
    path = Path(file)
    progress = Progress(_count_lines(path))
    bad = BadLines(path, progress)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    # Queue only towards a peer that completed the handshake, so "nobody there" (or the wrong
    # kind of socket, such as the publish endpoint) becomes a send timeout, not a silent queue.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.SNDTIMEO, int(SEND_TIMEOUT_S * 1000))
    sock.connect(endpoint)
    linger_ms = 0
    first_t: int | None = None
    sent = 0
    try:
        for columns in _batches(path, batch, bad):
            if speed > 0:
                first_t = columns["t"][0] if first_t is None else first_t
                due = progress.started + (columns["t"][0] - first_t) / 1e9 / speed
                time.sleep(max(0.0, due - time.monotonic()))
            try:
                sock.send(msgpack.packb(columns))
            except zmq.Again:
                msg = (
                    f"nothing received the ticks at {endpoint} within {SEND_TIMEOUT_S:g}s ({sent:,} of "
                    f"{progress.total:,} sent): is a daemon running with it in ingest.endpoints, in pull mode?"
                )
                raise ReplayError(msg) from None
            sent += len(columns["t"])
            progress.update(sent)
        linger_ms = int(SEND_TIMEOUT_S * 1000)
    finally:
        progress.finish()
        sock.close(linger_ms)
        ctx.term()
    if bad.count:
        sys.stderr.write(f"streamd: replay: sent {sent:,} ticks; skipped {bad.count:,} bad line(s) of {path}\n")
    if not sent and bad.count:
        msg = f"{path}: no line is a valid tick"
        raise ReplayError(msg)
    return 0
