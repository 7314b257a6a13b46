"""Section (c): the daemon end to end, as real processes, next to the raw transport in the same run.

Every case is one feed (wire form, string or integer keys, how many, uniform or Zipf), one publish
mode and 1 or N ingest endpoints. For each case, in this order:

1. the transport ceilings on the same payloads with the same generators: raw PUSH/PULL receive
   (count only) and the decode floor (receive + ``msgpack.unpackb``), one receiver process per
   endpoint;
2. an overload probe: a fresh daemon offered input as fast as the generators go; the slope of
   ``streamd_ticks_processed_total`` over the probe is what it processes under overload;
3. the sustained-rate search: fresh daemons offered rates in steps of 1.6x from the probe's rate
   (up while steps pass, down while they fail) until one passes and one fails, then one geometric
   bisection. Throughput under overload can be far below what the daemon sustains, so the probe
   is only a starting point (and a figure of its own). A step passes when no tick was dropped,
   the generators achieved the offered rate (a full input queue blocks PUSH, so falling short
   means the daemon pushed back), the backlog at the end of the load was under half a second of
   input, and all of it was received and processed within 0.5 s + 10% of the step after the
   load. In full mode the best rate is confirmed by a longer run.

Every step runs on a freshly started daemon with its own subscriber: input still queued after an
overloaded step would interleave with the next generator's newer event times and be dropped,
correctly, as ``late``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from bench.harness import (
    ROLES,
    Daemon,
    Feed,
    SignalOptions,
    finish,
    offer_load,
    raw_ceiling,
    running_daemon,
    start_subscriber,
)
from bench.report import Table, rate

DROP_REASONS = ("overflow", "late", "worker_lost", "bad_key", "bad_time", "bad_price", "bad_qty", "bad_tick")
STEP_FACTOR = 1.6
MAX_STEPS = 6
MIN_START_SHARE = 0.02  # of the decode floor, when the overload probe saw (almost) nothing processed
MIN_START = 20_000.0
WORKERS = 2
N_ENDPOINTS = 2


@dataclass(frozen=True)
class Case:
    """One end-to-end measurement: what is fed, how signals are published, over how many endpoints."""

    feed: Feed
    publish: str = "batch"
    endpoints: int = 1
    workers: int = WORKERS

    @property
    def generators_per_endpoint(self) -> int:
        """Single-tick maps need two generators to outrun one ingest on this box; columnar one."""
        return 2 if self.feed.form == "map" and self.endpoints == 1 else 1

    @property
    def headline(self) -> bool:
        return self.feed.key_type == "str"

    def key(self) -> str:
        f = self.feed
        return f"{f.form}-{f.key_type}-{f.keys}-{'uniform' if f.uniform else 'zipf'}-{self.publish}-{self.endpoints}ep"


def cases(quick: bool) -> list[Case]:
    """String keys first (the headline), integer keys last (a labelled variant)."""
    zipf10k, uniform100k = Feed("list", 10_000), Feed("list", 100_000, uniform=True)
    if quick:
        return [
            Case(zipf10k),
            Case(zipf10k, "record"),
            Case(uniform100k),
            Case(Feed("bin", 10_000)),
            Case(Feed("map", 10_000), "record"),
            Case(zipf10k, endpoints=N_ENDPOINTS),
            Case(Feed("list", 10_000, key_type="int")),
        ]
    return [
        Case(zipf10k),
        Case(Feed("list", 10_000, uniform=True)),
        Case(Feed("list", 100_000)),
        Case(uniform100k),
        Case(zipf10k, "record"),
        Case(uniform100k, "record"),
        Case(Feed("bin", 10_000)),
        Case(Feed("bin", 100_000, uniform=True)),
        Case(Feed("map", 10_000), "record"),
        Case(Feed("map", 10_000)),
        Case(Feed("map", 100_000, uniform=True), "record"),
        Case(zipf10k, endpoints=N_ENDPOINTS),
        Case(Feed("bin", 10_000), endpoints=N_ENDPOINTS),
        Case(Feed("map", 10_000), "record", endpoints=N_ENDPOINTS),
        Case(Feed("list", 10_000, key_type="int")),
        Case(Feed("map", 10_000, key_type="int"), "record"),
    ]


def timing(quick: bool) -> dict[str, float]:
    return {
        "probe": 2.0 if quick else 5.0,
        "step": 2.0 if quick else 5.0,
        "confirm": 0.0 if quick else 15.0,
        "raw": 1.0 if quick else 3.0,
        "raw_runs": 1 if quick else 3,
    }


# -- transport ceilings ------------------------------------------------------------------------


def measure_transport(case: Case, quick: bool) -> dict[str, Any]:
    """Raw receive and decode floor for the case's payloads, interleaved, median of the runs."""
    plan = timing(quick)
    raw, floor = [], []
    for _ in range(int(plan["raw_runs"])):
        raw.append(raw_ceiling(case.feed, case.endpoints, plan["raw"], case.generators_per_endpoint))
        floor.append(raw_ceiling(case.feed, case.endpoints, plan["raw"], case.generators_per_endpoint, decode=True))
    return {
        "raw_ticks_per_s": statistics.median(s["ticks_per_s"] for s in raw),
        "floor_ticks_per_s": statistics.median(s["ticks_per_s"] for s in floor),
        "bytes_per_message": raw[0]["bytes_per_message"],
        "raw": raw,
        "floor": floor,
    }


# -- the daemon ----------------------------------------------------------------------------------


def options(case: Case) -> SignalOptions:
    return SignalOptions(publish=case.publish)


def processed_under_overload(case: Case, duration: float) -> float:
    """Processed ticks/s of a fresh daemon offered input as fast as the generators can send."""
    with running_daemon(case.workers, options(case), endpoints=case.endpoints) as daemon:
        subscriber = start_subscriber(daemon.publish)
        try:
            samples: list[tuple[float, float]] = []
            offer_load(
                daemon.ingests,
                case.feed,
                0.0,
                duration,
                case.generators_per_endpoint,
                during=lambda: samples.append(sample_processed(daemon)),
            )
        finally:
            finish(subscriber, 1)
            daemon.kill()
    steady = samples[1:] if len(samples) > 2 else samples
    if len(steady) < 2:
        return 0.0
    (t0, n0), (t1, n1) = steady[0], steady[-1]
    return (n1 - n0) / max(t1 - t0, 1e-9)


def sample_processed(daemon: Daemon) -> tuple[float, float]:
    return time.monotonic(), daemon.counts()["processed"]


def step(case: Case, ticks_per_s: float, duration: float, quick: bool) -> dict[str, Any]:
    """Offer one rate for ``duration`` s to a fresh daemon and judge it (see the module docstring)."""
    with running_daemon(case.workers, options(case), endpoints=case.endpoints) as daemon:
        subscriber = start_subscriber(daemon.publish)
        try:
            result = judge_step(daemon, case, ticks_per_s, duration)
        finally:
            report = finish(subscriber, 1)[0]
        if not result["passed"]:
            daemon.kill()
    return result | {"subscriber_messages": report["messages"], "subscriber_cpu_s": report["cpu_s"]}


def catch_up_s(duration: float) -> float:
    """How long after the load the daemon may take to receive and process all of it: a daemon that
    keeps up has only what is in flight left. Input sockets buffer up to 100,000 messages, so a
    generous allowance would let a step pass that only buffered its input."""
    return 0.5 + 0.1 * duration


def judge_step(daemon: Daemon, case: Case, ticks_per_s: float, duration: float) -> dict[str, Any]:
    daemon.wait_idle(10.0)
    before = daemon.scrape()
    cpu_before = daemon.counts()
    backlog: list[float] = []
    load = offer_load(
        daemon.ingests,
        case.feed,
        ticks_per_s,
        duration,
        case.generators_per_endpoint,
        during=lambda: backlog.append(daemon.counts()["backlog"]),
    )
    end_backlog = daemon.counts()["backlog"]
    # PUSH "accepts" into socket buffers, so wait until the daemon has really received what was sent
    allowed = catch_up_s(duration)
    deadline = time.monotonic() + allowed
    received_all = daemon.wait_received(before.total("streamd_ticks_received_total") + load["ticks"], allowed)
    idle, cpu_after = daemon.wait_idle(max(deadline - time.monotonic(), 0.0))
    after = daemon.scrape()
    processed = after.total("streamd_ticks_processed_total") - before.total("streamd_ticks_processed_total")
    dropped = after.total("streamd_ticks_dropped_total") - before.total("streamd_ticks_dropped_total")
    reasons = []
    if dropped:
        by_reason = {
            r: after.total("streamd_ticks_dropped_total", reason=r)
            - before.total("streamd_ticks_dropped_total", reason=r)
            for r in DROP_REASONS
        }
        reasons.append(f"{dropped:.0f} dropped (" + ", ".join(f"{r} {v:.0f}" for r, v in by_reason.items() if v) + ")")
    if load["achieved"] < 0.97 * ticks_per_s:
        reasons.append(f"offered {rate(ticks_per_s)}, only {rate(load['achieved'])} accepted")
    if end_backlog > 0.5 * ticks_per_s:
        reasons.append(f"backlog {end_backlog:.0f} ticks at end")
    if not received_all:
        reasons.append(f"input not all received {allowed:.1f} s after the load")
    elif not idle:
        reasons.append(f"not all processed {allowed:.1f} s after the load")
    ticks = max(load["ticks"], 1)
    return {
        "offered": ticks_per_s,
        "achieved": load["achieved"],
        "processed_per_s": processed / load["elapsed"],
        "duration": duration,
        "dropped": dropped,
        "received_all": received_all,
        "max_backlog": max(backlog, default=0.0),
        "end_backlog": end_backlog,
        "drained": idle,
        "passed": not reasons,
        "why": "; ".join(reasons),
        "ticks": load["ticks"],
        "generator_cpu_s": load["generator_cpu_s"],
        "cpu_s_per_tick": {role: (cpu_after[f"cpu_{role}"] - cpu_before[f"cpu_{role}"]) / ticks for role in ROLES},
    }


def find_sustained(case: Case, quick: bool, floor: float = 0.0) -> dict[str, Any]:
    """Overload probe; steps of 1.6x from its rate until one passes and one fails; one geometric
    bisection between them; in full mode a longer confirmation of the best rate (0.85x if it fails)."""
    plan = timing(quick)
    overload = processed_under_overload(case, plan["probe"])
    steps: list[dict[str, Any]] = []
    # processed can stand still for a whole probe when a worker merges a deep queue into one call
    start = overload if overload > MIN_START_SHARE * floor else max(MIN_START_SHARE * floor, MIN_START)
    best, failed = bracket(case, start, quick, steps)
    if best and failed and step_passes(case, (best * failed) ** 0.5, plan["step"], quick, steps):
        best = (best * failed) ** 0.5
    if best and plan["confirm"]:
        for _ in range(3):
            if step_passes(case, best, plan["confirm"], quick, steps):
                break
            best *= 0.85
        else:
            best = 0.0
    at_best = [s for s in steps if s["passed"] and s["offered"] == best]
    return {
        "overload_processed_per_s": overload,
        "steps": steps,
        "sustained": best,
        "at_sustained": at_best[-1] if at_best else None,
    }


def bracket(case: Case, start: float, quick: bool, steps: list[dict[str, Any]]) -> tuple[float, float]:
    """The highest passing and the lowest failing offered rate seen, stepping by ``STEP_FACTOR`` from
    ``start`` (up while steps pass, down while they fail); 0.0 for a side never reached."""
    best = failed = 0.0
    offered = start
    for _ in range(MAX_STEPS):
        if not offered:
            break
        if step_passes(case, offered, timing(quick)["step"], quick, steps):
            best = offered
            offered *= STEP_FACTOR
        else:
            failed = offered
            offered /= STEP_FACTOR
        if best and failed:
            break
    return best, failed


def step_passes(case: Case, ticks_per_s: float, duration: float, quick: bool, steps: list[dict[str, Any]]) -> bool:
    result = step(case, ticks_per_s, duration, quick)
    steps.append(result)
    return bool(result["passed"])


# -- the section ---------------------------------------------------------------------------------


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.0%}" if reference else "n/a"


def cpu_cell(found: dict[str, Any]) -> str:
    at = found["at_sustained"]
    if not at:
        return "n/a"
    per_tick = at["cpu_s_per_tick"]
    return " / ".join(f"{per_tick[role] * 1e6:.2f}" for role in ROLES)


def run(quick: bool, earlier: dict[str, Any]) -> dict[str, Any]:
    plan = timing(quick)
    held = "one step" if quick else f"{plan['confirm']:.0f} s"
    table = Table(
        f"(c) Daemon end to end, {WORKERS} workers: highest offered rate held {held} with no drop, "
        "next to the transport on the same payloads",
        [
            "input",
            "publish",
            "endpoints",
            "sustained ticks/s",
            "processed under overload",
            "decode floor ticks/s",
            "raw receive ticks/s",
            "daemon / floor",
            "daemon / raw",
            "CPU us/tick ingest / workers / supervisor",
        ],
    )
    steps_table = Table(
        "(c) Daemon rate search (every step)",
        ["input", "publish", "endpoints", "offered", "accepted", "processed/s", "s", "max backlog", "result"],
    )
    data: dict[str, Any] = {}
    transports: dict[tuple[Feed, int], dict[str, Any]] = {}
    for case in cases(quick):
        where = (case.feed, case.endpoints)
        if where not in transports:
            transports[where] = measure_transport(case, quick)
        transport = transports[where]
        found = find_sustained(case, quick, transport["floor_ticks_per_s"])
        label = case.feed.label() + ("" if case.headline else "  (variant, not headline)")
        table.add(
            label,
            case.publish,
            case.endpoints,
            rate(found["sustained"]),
            rate(found["overload_processed_per_s"]),
            rate(transport["floor_ticks_per_s"]),
            rate(transport["raw_ticks_per_s"]),
            ratio(found["sustained"], transport["floor_ticks_per_s"]),
            ratio(found["sustained"], transport["raw_ticks_per_s"]),
            cpu_cell(found),
        )
        for s in found["steps"]:
            steps_table.add(
                label,
                case.publish,
                case.endpoints,
                rate(s["offered"]),
                rate(s["achieved"]),
                rate(s["processed_per_s"]),
                f"{s['duration']:.0f}",
                f"{s['max_backlog']:.0f}",
                "pass" if s["passed"] else s["why"],
            )
        data[case.key()] = {
            "feed": vars(case.feed),
            "publish": case.publish,
            "endpoints": case.endpoints,
            "generators_per_endpoint": case.generators_per_endpoint,
            "transport": transport,
            **found,
        }
    table.notes += [
        "Headline ratios: daemon / decode floor for columnar input (the floor is receive + msgpack.unpackb, "
        "no validation or compute); daemon / raw receive for single-tick maps.",
        f"Config: the built-in three signals (px1s, mean100, ewma1s) with the publish mode shown and no "
        f"emit_interval, max_batch_delay 1ms, max_batch_size 10000, {WORKERS} workers; with {N_ENDPOINTS} endpoints "
        "the feed shards its keys across them by a stable hash independent of the daemon's key -> worker hash. "
        "The daemon is started as `python -m streamd run --config FILE` with start_new_session=True (its own "
        "session, so its own autogroup for the kernel's CPU sharing, as under systemd); a subscriber process "
        "consumes all output.",
        "Load: paced generator processes (2 for single-tick maps on one endpoint, else 1 per endpoint), payloads "
        "pre-encoded, only the event time is stamped per send. Transport figures use the same generators and "
        "payloads into one plain PULL receiver process per endpoint.",
        "All processes share the machine's cores: generators, ingest, workers, supervisor/forwarder, subscriber.",
        "CPU us/tick: streamd_process_cpu_seconds_total per role over the passing step / ticks sent; the cost "
        "model (section (b)) uses them.",
        f"Transport ceilings: median of {int(plan['raw_runs'])} run(s) of {plan['raw']:.1f} s each, raw and "
        "floor interleaved. Sustained rate: one search per case (a single run per step, not a median).",
    ]
    table.data = data
    return {"title": "3. (c) Daemon, end to end", "tables": [table, steps_table]}
