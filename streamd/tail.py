"""``streamd tail``: print signals from a running daemon, one JSON object per row.

It ends quietly on Ctrl-C, after ``count`` rows, or when the reader of its output goes away
(``streamd tail | head``), like other Unix filters.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import zmq

from streamd.records import decode_record

QUIET_HINT_MS = 5000


def rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Record-mode messages are one row; batch-mode messages are expanded into rows."""
    if not isinstance(record.get("k"), list):
        return [record]
    columns = {name: value for name, value in record.items() if isinstance(value, list)}
    return [
        {"signal": record["signal"], "pub_ns": record["pub_ns"], **{name: col[i] for name, col in columns.items()}}
        for i in range(len(record["k"]))
    ]


def _print_rows(sock: zmq.Socket[Any], signal: str | None, key: str | None, count: int) -> None:
    printed = 0
    while True:
        for row in rows(decode_record(sock.recv_multipart())):
            if (signal and row["signal"] != signal) or (key is not None and str(row["k"]) != key):
                continue
            sys.stdout.write(json.dumps(row) + "\n")
            printed += 1
            if printed == count:
                sys.stdout.flush()
                return
        sys.stdout.flush()


def _silence_stdout() -> None:
    """The reader has gone: point stdout at /dev/null so the interpreter's final flush cannot fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def tail(endpoint: str, *, signal: str | None, key: str | None, count: int = 0) -> int:
    """Subscribe to ``endpoint`` and print matching rows until interrupted or ``count`` rows."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, (signal or "").encode())
    sock.connect(endpoint)
    try:
        if not sock.poll(QUIET_HINT_MS):
            sys.stderr.write(f"streamd: tail: nothing received from {endpoint} yet (is it the publish.endpoint?)\n")
        _print_rows(sock, signal, key, count)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        _silence_stdout()
    finally:
        sock.close(0)
        ctx.term()
    return 0
