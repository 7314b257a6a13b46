"""Section 4: cost per tick as windows grow, memory per key, and daemon throughput per worker count."""

from __future__ import annotations

import statistics
from typing import Any

from bench.daemon import Case, find_sustained
from bench.harness import CONTEXT, Feed
from bench.report import Table, median_of, rate, timed, verdict
from bench.ticks import Ticks, generate
from streamd.config import SignalSpec
from streamd.windows import Engine

WINDOW_PAIRS = (
    (
        "time",
        1_000_000_000,
        60_000_000_000,
        "1 s",
        "60 s",
        ("count", "mean", "std", "min", "max", "vwap", "last", "zscore"),
    ),
    ("count", 100, 10_000, "100", "10,000", ("mean", "std")),
)
BATCH = 10_000


def engine_seconds(ticks: Ticks, spec: SignalSpec) -> float:
    engine = Engine([spec])
    return timed(
        lambda: [
            engine.process(
                ticks.keys[s : s + BATCH], ticks.t[s : s + BATCH], ticks.p[s : s + BATCH], ticks.q[s : s + BATCH]
            )
            for s in range(0, len(ticks), BATCH)
        ]
    )


def window_lengths(quick: bool) -> Table:
    n = 2_000_000 if quick else 6_000_000
    # 180 s of event time (so a 60 s window fills and turns over), 1,000 keys
    ticks = generate(n, 1_000, events_per_s=n / 180)
    table = Table(
        f"Engine cost per tick vs window length ({n:,} ticks over 180 s of event time, 1,000 keys, "
        f"batches of {BATCH:,}; median of 3)",
        ["window", "short", "long", "ns/tick short", "ns/tick long", "long / short", "target", "verdict"],
    )
    for kind, short, long, short_label, long_label, stats in WINDOW_PAIRS:
        seconds = {}
        for size in (short, long):
            spec = SignalSpec("s", kind, size, stats)
            seconds[size], _ = median_of(3, lambda s=spec: engine_seconds(ticks, s))
        ratio = seconds[long] / seconds[short]
        table.add(
            kind,
            short_label,
            long_label,
            f"{seconds[short] / n * 1e9:.0f}",
            f"{seconds[long] / n * 1e9:.0f}",
            f"{ratio:.2f}x",
            "<= 1.3x",
            verdict(ratio, 1.3, higher_is_better=False),
        )
    table.notes.append(
        f"Time windows use the px1s stats; count windows mean and std. {n / 180 / 1e3:.1f}k ticks/s of "
        "event time, so a 60 s window holds ~60x the ticks of a 1 s one."
    )
    return table


def memory_probe(n_keys: int, ticks_per_key: int, results: Any) -> None:
    """In a fresh process: RSS before and after filling one time-1s signal's state for ``n_keys`` keys."""
    import numpy as np

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    ticks = generate(n_keys * ticks_per_key, n_keys, events_per_s=n_keys * ticks_per_key * 2, uniform=True)
    specs = [
        SignalSpec("px1s", "time", 1_000_000_000, ("count", "mean", "std", "min", "max", "vwap", "last", "zscore"))
    ]
    engine = Engine(specs)
    engine.process(np.zeros(1, np.int64), ticks.t[:1], ticks.p[:1], ticks.q[:1])
    before = rss()
    step = 100_000
    for s in range(0, len(ticks), step):
        engine.process(ticks.keys[s : s + step], ticks.t[s : s + step], ticks.p[s : s + step], ticks.q[s : s + step])
    results.put(
        {
            "keys": engine.n_keys,
            "state_bytes": engine.memory_bytes(),
            "rss_delta": rss() - before,
            "ticks_per_key": ticks_per_key,
        }
    )


def memory(quick: bool) -> Table:
    ticks_per_key = 4
    table = Table(
        f"Memory per key: one time-1s signal (px1s stats), {ticks_per_key} live ticks per key (uniform keys)",
        ["keys", "Engine.memory_bytes()", "per key", "process RSS growth", "RSS per key", "target", "verdict"],
    )
    for n_keys in (10_000, 100_000, 1_000_000):
        samples = []
        for _ in range(3):
            queue = CONTEXT.Queue()
            process = CONTEXT.Process(target=memory_probe, args=(n_keys, ticks_per_key, queue))
            process.start()
            samples.append(queue.get(timeout=300))
            process.join(30)
        state = statistics.median(s["state_bytes"] for s in samples)
        rss = statistics.median(s["rss_delta"] for s in samples)
        target = result = ""
        if n_keys == 1_000_000:
            target, result = "< 2 KiB / key / signal", verdict(state / n_keys, 2048, higher_is_better=False)
        table.add(
            f"{n_keys:,}",
            f"{state / 2**20:.1f} MiB",
            f"{state / n_keys:.0f} B",
            f"{rss / 2**20:.1f} MiB",
            f"{rss / n_keys:.0f} B",
            target,
            result,
        )
    table.notes.append(
        "Each size runs in a fresh spawned process (median of 3); RSS growth is measured from after "
        "the first tick to after the last, so it includes NumPy temporaries still mapped."
    )
    return table


def workers(quick: bool) -> Table:
    feed = Feed("bin", 10_000)
    table = Table(
        f"Daemon throughput ({feed.label()}) vs worker count", ["workers", "sustained ticks/s", "vs 1 worker"]
    )
    found = {w: find_sustained(Case(feed, workers=w), quick) for w in (1, 2)}
    for w in (1, 2):
        table.add(w, rate(found[w]["sustained"]), f"{found[w]['sustained'] / max(found[1]['sustained'], 1):.2f}x")
    table.notes.append(
        "Same search and pass criteria as section (c); the machine has 2 cores shared with the ingest, "
        "the generator and the subscriber, so 2 workers compete with them for CPU."
    )
    table.data = {str(w): v for w, v in found.items()}
    return table


def run(quick: bool, earlier: dict[str, Any]) -> dict[str, Any]:
    return {"title": "7. Scaling", "tables": [window_lengths(quick), memory(quick), workers(quick)]}
