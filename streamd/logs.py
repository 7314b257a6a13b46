"""Structured, journald-friendly logging: one line per event, logfmt or JSON, to stderr.

Anything an input can trigger goes through :class:`RateLimiter` so a flood of bad ticks
produces a few lines per second with a count of what was suppressed, never a log storm.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from streamd.config import LogConfig

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)))


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    extra = {k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")}
    base = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "proc": record.name,
        "msg": record.getMessage(),
    }
    return base | extra


def _logfmt_value(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info proc=ingest msg="..." key=value`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line = " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items())
        if record.exc_info:
            line += " exc=" + _logfmt_value(self.formatException(record.exc_info).replace("\n", " | "))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return json.dumps(fields, default=str, ensure_ascii=False)


def setup_logging(config: LogConfig, role: str) -> logging.Logger:
    """Configure this process's root logger and return the logger named after its role."""
    logging.getLogger().handlers[:] = [logging.StreamHandler(sys.stderr)]
    apply_log_config(config)
    return logging.getLogger(role)


def apply_log_config(config: LogConfig) -> None:
    """Apply ``[log]`` level and format to this process (at start and on every reload)."""
    root = logging.getLogger()
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter() if config.format == "json" else LogfmtFormatter())
    root.setLevel(config.level.upper())


class RateLimiter:
    """Token bucket per event kind; reports how many events were suppressed in between."""

    def __init__(self, logger: logging.Logger, per_second: float, clock: Any = time.monotonic) -> None:
        self._logger = logger
        self._rate = per_second
        self._clock = clock
        self._buckets: dict[str, tuple[float, float, int]] = {}

    def warning(self, kind: str, msg: str, **fields: object) -> None:
        """Log ``msg`` unless ``kind`` exceeded its rate; suppressed events are counted in the next line."""
        now = self._clock()
        tokens, last, suppressed = self._buckets.get(kind, (self._rate, now, 0))
        tokens = min(self._rate, tokens + (now - last) * self._rate)
        if tokens < 1.0:
            self._buckets[kind] = (tokens, now, suppressed + 1)
            return
        self._buckets[kind] = (tokens - 1.0, now, 0)
        self._logger.warning(msg, extra={"event": kind, "suppressed": suppressed, **fields})
