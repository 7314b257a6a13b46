"""``streamd tail``: print signals from a running daemon, one JSON object per row."""

from __future__ import annotations

import json
import sys
from typing import Any

import zmq

from streamd.records import decode_record


def rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Record-mode messages are one row; batch-mode messages are expanded into rows."""
    if not isinstance(record.get("k"), list):
        return [record]
    columns = {name: value for name, value in record.items() if isinstance(value, list)}
    return [
        {"signal": record["signal"], "pub_ns": record["pub_ns"], **{name: col[i] for name, col in columns.items()}}
        for i in range(len(record["k"]))
    ]


def tail(endpoint: str, *, signal: str | None, key: str | None, count: int = 0) -> int:
    """Subscribe to ``endpoint`` and print matching rows until interrupted or ``count`` rows."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, (signal or "").encode())
    sock.connect(endpoint)
    printed = 0
    try:
        while not count or printed < count:
            for row in rows(decode_record(sock.recv_multipart())):
                if (signal and row["signal"] != signal) or (key is not None and str(row["k"]) != key):
                    continue
                sys.stdout.write(json.dumps(row) + "\n")
                printed += 1
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        sock.close(0)
        ctx.term()
    return 0
