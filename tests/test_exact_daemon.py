"""The real daemon's records at the edges, over real sockets, against the exact (Fraction) oracle."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from tests.helpers import Subscriber, accounting, feed, running_daemon
from tests.oracle import exact_tolerance, exact_window_stats

STATS = ["count", "sum", "mean", "std", "var", "min", "max", "volume", "vwap", "zscore"]
SIGNALS = f"""
[[signal]]
name = "cw"
window = "count"
size = 20
stats = {STATS!r}
[[signal]]
name = "tw"
window = "time"
size = "50us"
stats = {STATS!r}
""".replace("'", '"')
BASE = 1_700_000_000_000_000_000


def edge_stream(key: str, level: float, shift: float, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Non-dyadic trades at ``level``, a quote-only stretch, a long constant run, then a jump by ``shift``."""
    prices = [level + k * 0.1 for k in rng.integers(-5, 6, 40)]
    prices += [prices[-1]] * 30 + [level + shift + k * 0.1 for k in rng.integers(-5, 6, 40)]
    qty = (
        [float(x) for x in rng.choice([0.3, 1.7, 2.9], 40)]
        + [0.0] * 30
        + [float(x) for x in rng.choice([0.3, 1.1], 40)]
    )
    return [
        {"k": key, "t": BASE + 1_000 * i, "p": float(p), "q": q}
        for i, (p, q) in enumerate(zip(prices, qty, strict=True))
    ]


def window_of(name: str, ticks: list[dict[str, Any]], t: int) -> list[dict[str, Any]]:
    upto = [x for x in ticks if x["t"] <= t]
    return upto[-20:] if name == "cw" else [x for x in upto if x["t"] > t - 50_000]


def test_records_at_level_shifts_quote_stretches_and_constant_runs_are_exact(tmp_path: Path) -> None:
    """Every stat of every record is within 1e-9 of Fraction arithmetic; quote-only windows: volume 0, no vwap."""
    rng = np.random.default_rng(9)
    cases = [("NEG", -250.3, 1e4), ("TINY", 1e-3, 5e-3), ("BIG", 1e9, 1e4), ("JUMP", 1e9, -1e9 + 0.1)]
    streams = {key: edge_stream(key, level, shift, rng) for key, level, shift in cases}
    with running_daemon(tmp_path, workers=2, extra_toml=SIGNALS) as daemon:
        sub = Subscriber(daemon)
        sub.sync()
        for i in range(0, 110, 7):  # batches that cut every stretch differently, each applied on its own
            chunk = {key: stream[i : i + 7] for key, stream in streams.items()}
            feed(daemon.ingest, [msgpack.packb([tick for ticks in chunk.values() for tick in ticks])])
            newest = {key: ticks[-1]["t"] for key, ticks in chunk.items() if ticks}
            sub.collect(
                lambda newest=newest: sum(1 for r in sub.records if newest.get(r["k"]) == r["t"]) == 2 * len(newest)
            )
        sub.close()
        samples = daemon.wait_idle()
    checked = quote_only = constant = 0
    for record in sub.records:
        if record["k"] not in streams:
            continue
        window = window_of(record["signal"], streams[record["k"]], record["t"])
        p, q = [x["p"] for x in window], [x["q"] for x in window]
        exact = exact_window_stats(p, q)
        for stat in STATS:
            got = math.nan if record[stat] is None else float(record[stat])
            want = exact[stat]
            where = f"{record['signal']}.{record['k']} t={record['t']} {stat}"
            if math.isnan(want):
                assert math.isnan(got), f"{where}: exact is undefined, got {got!r}"
            else:
                tolerance = exact_tolerance(stat, p, 1e-9)
                assert math.isclose(got, want, rel_tol=1e-9, abs_tol=tolerance), f"{where}: {got!r} vs exact {want!r}"
        if not any(q):
            assert record["volume"] == 0 and record["vwap"] is None
            quote_only += 1
        if len(set(p)) == 1 and len(p) > 1:
            assert record["std"] == 0 and record["zscore"] is None
            constant += 1
        checked += 1
    assert checked >= 2 * len(streams) and quote_only and constant
    assert accounting(samples) == 0
