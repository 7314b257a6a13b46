"""``streamd replay``: publish ticks from a CSV file (header ``k,t,p,q``) as columnar batches.

With ``--speed X`` (X > 0) batches are paced by event time, X times faster than real
time; with 0 they go out as fast as the socket takes them. Keys are sent as strings.
"""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import zmq

from streamd.config import ConfigError


def _batches(path: Path, size: int) -> Iterator[dict[str, list[object]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        if [h.strip() for h in header[:3]] != ["k", "t", "p"]:
            msg = f"{path}: first line must be the header k,t,p,q (got {','.join(header)!r})"
            raise ConfigError(msg)
        batch: dict[str, list[object]] = {"k": [], "t": [], "p": [], "q": []}
        for line, row in enumerate(reader, start=2):
            try:
                batch["k"].append(row[0])
                batch["t"].append(int(row[1]))
                batch["p"].append(float(row[2]))
                batch["q"].append(float(row[3]) if len(row) > 3 and row[3] != "" else 0.0)
            except (ValueError, IndexError):
                msg = f"{path}:{line}: expected k,t,p,q with integer t and numeric p, q; got {row!r}"
                raise ConfigError(msg) from None
            if len(batch["t"]) == size:
                yield batch
                batch = {"k": [], "t": [], "p": [], "q": []}
        if batch["t"]:
            yield batch


def _progress(sent: int, total: int, started: float) -> None:
    width = 30
    done = sent / total if total else 1.0
    rate = sent / max(time.monotonic() - started, 1e-9)
    bar = "#" * int(done * width)
    sys.stderr.write(f"\r[{bar:<{width}}] {done:6.1%} {sent:,}/{total:,} ticks {rate:,.0f}/s")
    sys.stderr.flush()


def replay(file: str, endpoint: str, *, speed: float = 0.0, batch: int = 1000) -> int:
    path = Path(file)
    with path.open("rb") as handle:
        total = max(0, sum(1 for _ in handle) - 1)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, -1)
    sock.connect(endpoint)
    started = time.monotonic()
    first_t: int | None = None
    sent = 0
    try:
        for columns in _batches(path, batch):
            if speed > 0:
                first_t = columns["t"][0] if first_t is None else first_t  # type: ignore[assignment]
                due = started + (columns["t"][0] - first_t) / 1e9 / speed  # type: ignore[operator]
                time.sleep(max(0.0, due - time.monotonic()))
            sock.send(msgpack.packb(columns))
            sent += len(columns["t"])
            _progress(sent, total, started)
    finally:
        sys.stderr.write("\n")
        sock.close()
        ctx.term()
    return 0
