"""Structured logs: one line per event, logfmt or JSON, and rate limiting for input-triggered events."""

from __future__ import annotations

import json
import logging

import pytest

from streamd.config import LogConfig
from streamd.logs import JsonFormatter, LogfmtFormatter, RateLimiter, setup_logging


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("ingest", logging.WARNING, __file__, 1, msg, None, None)
    record.__dict__.update(extra)
    return record


def test_logfmt_is_one_line_with_quoted_values() -> None:
    """logfmt puts every field on one line and quotes values with spaces or quotes."""
    line = LogfmtFormatter().format(_record("input dropped", reason="bad_price", example='p="x" (key A)'))
    assert "\n" not in line
    assert "level=warning proc=ingest" in line
    assert 'msg="input dropped"' in line and "reason=bad_price" in line
    assert 'example="p=\\"x\\" (key A)"' in line


def test_json_lines_parse() -> None:
    """The JSON format is one parseable object per line with the extra fields."""
    fields = json.loads(JsonFormatter().format(_record("worker died", worker=1, exitcode=-9)))
    assert fields["msg"] == "worker died" and fields["worker"] == 1 and fields["exitcode"] == -9


def test_rate_limiter_suppresses_and_reports_the_count(caplog: pytest.LogCaptureFixture) -> None:
    """Past the rate, events are suppressed per kind, and the next line says how many were."""
    now = [0.0]
    limiter = RateLimiter(logging.getLogger("t"), per_second=2.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        for _ in range(100):
            limiter.warning("bad_price", "input dropped")
        limiter.warning("bad_key", "input dropped")
        now[0] += 1.0
        limiter.warning("bad_price", "input dropped")
    kinds = [(r.event, r.suppressed) for r in caplog.records]  # type: ignore[attr-defined]
    assert kinds == [("bad_price", 0), ("bad_price", 0), ("bad_key", 0), ("bad_price", 98)]


def test_level_is_configurable() -> None:
    """log.level sets the root level of the process."""
    setup_logging(LogConfig(level="error"), "worker0")
    assert logging.getLogger().level == logging.ERROR
    setup_logging(LogConfig(), "worker0")
    assert logging.getLogger().level == logging.INFO
