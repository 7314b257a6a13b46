"""Section 3: publish latency at fixed offered loads, seen by a subscriber on the same host clock.

The generator stamps each single-tick message's event time with its wall clock at send; a record's
``t`` is the newest tick's event time, so ``subscriber receive wall clock - t`` is send-to-receive
latency through ingest, batching (``max_batch_delay = 1ms``), the worker and the forwarder.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from bench.harness import (
    HDR_BUCKETS,
    Daemon,
    SignalOptions,
    finish,
    hdr_quantiles,
    offer_load,
    running_daemon,
    start_subscriber,
)
from bench.report import Table, verdict

LOADS = (10_000, 50_000, 100_000)
N_KEYS = 1_000
QUANTILES = (0.5, 0.99, 0.999, 1.0)
TOPIC = "px1s."


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus ``histogram_quantile``: linear interpolation inside the cumulative bucket."""
    total = buckets[-1][1] if buckets else 0.0
    if not total:
        return float("nan")
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return lower_bound


def one_run(daemon: Daemon, load: int, duration: float) -> dict[str, Any]:
    daemon.wait_idle(10.0)
    before = daemon.scrape().buckets("streamd_latency_seconds")
    subscriber = start_subscriber(daemon.publish, TOPIC, measure_latency=True, warmup_s=0.5)
    generated = offer_load(daemon.ingest, "map", N_KEYS, load, duration, 1)
    daemon.wait_idle(5.0)
    report = finish(subscriber, 1)[0]
    after = daemon.scrape().buckets("streamd_latency_seconds")
    delta = [(bound, count - dict(before).get(bound, 0.0)) for bound, count in after]
    counts = np.asarray(report["hdr"])
    return {
        "achieved": generated["achieved"],
        "records": int(counts.sum()),
        "subscriber_ns": hdr_quantiles(counts, QUANTILES),
        "internal_s": [histogram_quantile(delta, q) for q in (0.5, 0.99, 0.999)],
    }


def run(quick: bool) -> dict[str, Any]:
    runs, duration = 3, (3.0 if quick else 10.0)
    table = Table(
        f"Latency, send -> subscriber receive (HDR histogram, {N_KEYS:,} keys, single-tick messages); "
        f"median of {runs} runs x {duration:.0f} s",
        [
            "offered ticks/s",
            "records measured",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "internal p50 / p99 / p99.9 ms",
            "target",
            "verdict",
        ],
    )
    data: dict[str, Any] = {}
    with running_daemon(0, SignalOptions()) as daemon:
        for load in LOADS:
            results = [one_run(daemon, load, duration) for _ in range(runs)]
            sub = [statistics.median(r["subscriber_ns"][i] for r in results) / 1e6 for i in range(len(QUANTILES))]
            internal = [statistics.median(r["internal_s"][i] for r in results) * 1e3 for i in range(3)]
            target = result = ""
            if load == 50_000:
                target = "p99 < 2 ms, p99.9 < 5 ms"
                result = verdict(min(2.0 / sub[1], 5.0 / sub[2]), 1.0)
            table.add(
                f"{load:,}",
                f"{sum(r['records'] for r in results):,}",
                *(f"{v:.2f}" for v in sub),
                " / ".join(f"{v:.2f}" for v in internal),
                target,
                result,
            )
            data[str(load)] = results
    table.notes += [
        "Daemon: built-in three signals in record mode (one message per key per batch, no emit_interval), "
        "max_batch_delay 1ms, workers = one per core (2). The subscriber subscribes to `px1s.` only (filtered "
        "in the forwarder) and decodes every record; warm-up of 0.5 s per run excluded.",
        "Latency = subscriber wall clock at receive - record `t` (the event time the generator stamped with its "
        "wall clock at send); a key with several ticks in one batch is measured at its newest tick.",
        f"HDR-style histogram: exact below 128 ns, then 64 linear sub-buckets per power of two "
        f"({HDR_BUCKETS} buckets, < 1.6% error); quantiles are bucket upper edges.",
        "internal = streamd_latency_seconds from /metrics (ingest receive of the batch's oldest tick -> publish), "
        "quantiles interpolated as Prometheus' histogram_quantile does, over the run's bucket deltas.",
    ]
    table.data = data
    return {"title": "3. Latency", "tables": [table]}
