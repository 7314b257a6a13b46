"""The documents a user reads list what the code does: variables, drop reasons, window definitions."""

from __future__ import annotations

import re
from pathlib import Path

from streamd.cli import OPTIONS
from streamd.config import EWMA_STATS, WINDOW_STATS
from streamd.protocol import MESSAGE_DROP_REASONS, TICK_DROP_REASONS

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = (ROOT / "docs" / "protocol.md").read_text()


def test_every_option_has_a_documented_variable() -> None:
    """Each option of each command reads a STREAMD_* variable, listed in README.md and docs/deploy.md."""
    readme = (ROOT / "README.md").read_text()
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    variables = {option.variable for options in OPTIONS.values() for option in options}
    assert {"STREAMD_COUNT", "STREAMD_SPEED", "STREAMD_BATCH", "STREAMD_RATE", "STREAMD_KEYS"} <= variables
    for variable in variables:
        assert f"`{variable}`" in readme, variable
        assert f"`{variable}`" in deploy, variable


def test_protocol_lists_every_drop_reason() -> None:
    """Decoder reasons and the ones counted later (late, overflow, worker_lost) are all in docs/protocol.md."""
    source = "".join(path.read_text() for path in (ROOT / "streamd").glob("*.py"))
    later = set(re.findall(r'ticks_dropped\.labels\("(\w+)"\)', source))
    assert {"late", "overflow", "worker_lost"} <= later
    for reason in (*TICK_DROP_REASONS, *MESSAGE_DROP_REASONS, *later):
        assert f"| `{reason}` |" in PROTOCOL, reason


def test_protocol_defines_every_window_and_stat() -> None:
    """docs/protocol.md, not only the README, defines each window kind and each statistic."""
    windows = PROTOCOL[PROTOCOL.index("## Windows") : PROTOCOL.index("## Output protocol")]
    for kind in ("time", "count", "ewma"):
        assert f'| `"{kind}"` |' in windows, kind
    for stat in (*WINDOW_STATS, *EWMA_STATS):
        assert f"`{stat}`" in windows, stat
    assert "t - W < t_i <= t" in windows
