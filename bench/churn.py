"""Engine memory under key churn: keys arrive, tick a while, go silent, are evicted, indices reused.

``python -m bench.churn [--quick] [--keys N] [--live N] [--ttl-s S]``

The engine alone (the three built-in signals, compiled kernel when built) is fed a simulated
stream in which key ``i`` starts at ``i * gap`` and ticks ``--ticks-per-key`` times, one
``--interval-s`` apart; ``gap`` is chosen so that about ``--live`` keys tick at any moment. A
key is evicted ``--ttl-s`` after its last tick, and its local index goes back on a free list
that the next new keys take from, as the worker does with ``[state] key_ttl``. Time is simulated,
so the run takes as long as the engine needs. Every ``--every`` keys the table prints the keys
held, the engine's ``memory_bytes()`` and the process's resident memory; then the slope of both
after warm-up (once held keys are steady), the same stream without eviction (a fresh index per
key) for comparison, what one ``Engine.evict`` call costs by batch size, the time per engine
call under a flood of one-tick keys (``--flood-only`` runs just that), and the time per call while
the key population climbs to a new high, when the per-key tables and tick pools grow
(``--growth-only`` runs just that; ``--before REV`` adds the engine as it was at git revision REV,
runs interleaved).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.batch_cost import engine_from_revision
from bench.report import Table, machine, machine_line, print_tables
from streamd.config import DEFAULT_SIGNALS
from streamd.windows import KERNEL, Engine

SECOND = 1_000_000_000
EVICT_SIZES = (1, 100, 1_000, 10_000)
SAMPLES_PER_ROW = 10  # memory is sampled 10 times per table row, for the slopes


@dataclass(frozen=True)
class Plan:
    """The simulated stream: how many keys, how they overlap, when they are evicted."""

    keys: int
    live: int
    ticks_per_key: int
    interval_ns: int
    ttl_ns: int
    step_ns: int

    @property
    def lifetime_ns(self) -> int:
        return (self.ticks_per_key - 1) * self.interval_ns

    @property
    def gap_ns(self) -> int:
        """Time between two keys' first ticks, so that ``live`` keys are ticking at once."""
        return max(1, self.lifetime_ns // self.live)

    @property
    def held(self) -> int:
        """Keys held at steady state: ticking, or silent and waiting for their TTL."""
        return (self.lifetime_ns + self.ttl_ns) // self.gap_ns


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Stream:
    """Ticks and evictions of the simulated stream, one step of simulated time after another."""

    plan: Plan
    evict_indices: bool
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(7))
    index_of: np.ndarray = field(init=False)
    free: list[np.ndarray] = field(default_factory=list)
    next_index: int = 0
    started: int = 0  # keys that had their first tick
    evicted: int = 0  # keys evicted so far (key ids below this)

    def __post_init__(self) -> None:
        self.index_of = np.full(self.plan.keys, -1, np.int64)

    def expired(self, now: int) -> np.ndarray:
        """Indices of keys whose TTL ran out before ``now``, released for reuse."""
        plan = self.plan
        upto = min(plan.keys, max(0, ceil_div(now - plan.lifetime_ns - plan.ttl_ns, plan.gap_ns)))
        indices = self.index_of[self.evicted : upto]
        self.evicted = max(self.evicted, upto)
        if indices.size:
            self.free.append(indices)
        return indices

    def assign(self, count: int) -> np.ndarray:
        """Local indices for ``count`` new keys: released ones first, then never-used ones."""
        pool = np.concatenate(self.free) if self.free else np.zeros(0, np.int64)
        taken, rest = pool[:count], pool[count:]
        self.free = [rest] if rest.size else []
        fresh = np.arange(self.next_index, self.next_index + count - taken.size, dtype=np.int64)
        self.next_index += fresh.size
        return np.concatenate([taken, fresh])

    def ticks(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Ticks with times in [start, stop), in time order: (indices, t, p, q)."""
        plan = self.plan
        newcomers = min(plan.keys, ceil_div(stop, plan.gap_ns)) - self.started
        if newcomers > 0:
            if self.evict_indices:
                self.index_of[self.started : self.started + newcomers] = self.assign(newcomers)
            else:
                self.index_of[self.started : self.started + newcomers] = np.arange(
                    self.started, self.started + newcomers
                )
            self.started += newcomers
        keys, times = [], []
        for tick in range(plan.ticks_per_key):
            offset = tick * plan.interval_ns
            lo = max(0, ceil_div(start - offset, plan.gap_ns))
            hi = min(plan.keys, ceil_div(stop - offset, plan.gap_ns))
            if hi > lo:
                ids = np.arange(lo, hi, dtype=np.int64)
                keys.append(ids)
                times.append(ids * plan.gap_ns + offset)
        if not keys:
            empty = np.zeros(0, np.int64)
            return empty, empty, np.zeros(0), np.zeros(0)
        ids, t = np.concatenate(keys), np.concatenate(times)
        order = np.argsort(t, kind="stable")
        ids, t = ids[order], t[order]
        p = 100.0 + (ids % 997) * 0.01 + self.rng.integers(-50, 50, ids.size) * 0.001
        q = self.rng.integers(0, 5, ids.size).astype(np.float64)
        return self.index_of[ids], t, p, q


def resident_bytes() -> int:
    """Resident set size of this process (Linux /proc), 0 where unavailable."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


@dataclass
class Sample:
    keys_started: int
    simulated_s: float
    held: int
    engine_bytes: int
    rss_bytes: int
    ns_per_tick: float


@dataclass
class Run:
    samples: list[Sample]
    evict_seconds: float
    evicted_keys: int
    evict_calls: int
    ticks: int
    wall_s: float


def simulate(plan: Plan, every: int, evict_indices: bool = True, table: Table | None = None) -> Run:
    """Feed the whole stream to one engine; sample memory every ``every`` keys started (and at
    the end), adding every ``SAMPLES_PER_ROW``-th sample to ``table``."""
    engine, stream = Engine(DEFAULT_SIGNALS), Stream(plan, evict_indices)
    end = plan.keys * plan.gap_ns + plan.lifetime_ns + plan.ttl_ns + plan.step_ns
    samples: list[Sample] = []
    evict_seconds, evicted, calls, ticks, process_seconds, ticks_since = 0.0, 0, 0, 0, 0.0, 0
    next_sample = every
    began = time.perf_counter()
    for now in range(0, end, plan.step_ns):
        if evict_indices:
            released = stream.expired(now)
            if released.size:
                started = time.perf_counter()
                engine.evict(released)
                evict_seconds += time.perf_counter() - started
                evicted, calls = evicted + released.size, calls + 1
        slots, t, p, q = stream.ticks(now, now + plan.step_ns)
        if slots.size:
            started = time.perf_counter()
            engine.process(slots, t, p, q)
            process_seconds += time.perf_counter() - started
            ticks, ticks_since = ticks + slots.size, ticks_since + slots.size
        if stream.started >= next_sample or now + plan.step_ns >= end:
            sample = Sample(
                stream.started,
                now / SECOND,
                engine.n_keys,
                engine.memory_bytes(),
                resident_bytes(),
                process_seconds / max(ticks_since, 1) * 1e9,
            )
            samples.append(sample)
            if table is not None and (len(samples) % SAMPLES_PER_ROW == 0 or now + plan.step_ns >= end):
                add_sample_row(table, sample)
                print("  ".join(table.rows[-1]), flush=True)
            if len(samples) % SAMPLES_PER_ROW == 0:
                process_seconds, ticks_since = 0.0, 0
            next_sample += every
            if stream.started >= plan.keys and now + plan.step_ns < end:
                next_sample = sys.maxsize
    return Run(samples, evict_seconds, evicted, calls, ticks, time.perf_counter() - began)


def add_sample_row(table: Table, sample: Sample) -> None:
    table.add(
        f"{sample.keys_started:,}",
        f"{sample.simulated_s:,.0f}",
        f"{sample.held:,}",
        f"{sample.engine_bytes / 2**20:.1f}",
        f"{sample.rss_bytes / 2**20:.1f}",
        f"{sample.ns_per_tick:.0f}",
    )


def mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def slope_per_million_keys(samples: list[Sample], values: list[int]) -> float:
    """Least-squares growth of ``values`` per million keys started."""
    keys = np.array([s.keys_started for s in samples], np.float64)
    if keys.size < 2 or np.ptp(keys) == 0:
        return float("nan")
    return float(np.polyfit(keys, np.array(values, np.float64), 1)[0]) * 1e6


def steady(plan: Plan, samples: list[Sample]) -> list[Sample]:
    """Samples after warm-up: once keys evicted by TTL are replaced as fast as new ones arrive,
    leaving out the last (the tail of the stream, when keys stop arriving)."""
    warm = 2 * plan.held
    body = [s for s in samples[:-1] if s.keys_started >= warm and s.keys_started < plan.keys]
    return body if len(body) >= 2 else samples[:-1]


def evict_bench_keys(plan: Plan) -> int:
    """Keys held while timing evictions: the run's, or enough that the largest batch is a tenth."""
    return max(plan.held, 10 * max(EVICT_SIZES))


def eviction_cost(plan: Plan, repeats: int) -> dict[int, tuple[list[float], list[float]]]:
    """Seconds per ``Engine.evict`` call by batch size, on an engine holding ~``plan.held`` keys of
    ``plan.ticks_per_key`` ticks; sizes interleaved, evicted indices refilled (untimed) by new keys.

    Each sample times a run of calls (1,000 keys in all, at least one call) and divides: a single
    call of a few µs right after the refill mostly measures the machine (the scheduler, caches).
    Samples come back in two lists: without and with a compaction (seen as ``memory_bytes()``
    changing: eviction alone never resizes anything).
    """
    held = evict_bench_keys(plan)
    engine, rng = Engine(DEFAULT_SIGNALS), np.random.default_rng(3)
    now = 0

    def fill(indices: np.ndarray) -> None:
        nonlocal now
        for _ in range(plan.ticks_per_key):
            now += plan.interval_ns
            engine.process(indices, np.full(indices.size, now), 100 + rng.random(indices.size), np.ones(indices.size))

    fill(np.arange(held, dtype=np.int64))
    seconds: dict[int, tuple[list[float], list[float]]] = {size: ([], []) for size in EVICT_SIZES}
    for _ in range(repeats):
        for size in EVICT_SIZES:
            calls = max(1, 1_000 // size)
            chosen = rng.choice(held, size * calls, replace=False).astype(np.int64)
            before = engine.memory_bytes()
            started = time.perf_counter()
            for call in range(calls):
                engine.evict(chosen[call * size : (call + 1) * size])
            elapsed = (time.perf_counter() - started) / calls
            seconds[size][engine.memory_bytes() != before].append(elapsed)
            fill(chosen)
    return seconds


def flood_calls(population: int, per_batch: int = 1_000, evict_per_call: int = 4_000, calls: int = 3_000) -> Table:
    """A worker's engine under a flood of one-tick keys: each call brings ``per_batch`` new keys,
    the oldest keys are evicted ``evict_per_call`` at a time to hold ``population``, and freed
    indices are reused newest first (as the key table does). Time per call once the population is
    reached, and how often the tick pool was re-laid (compacted) or grown."""
    engine = Engine(list(DEFAULT_SIGNALS))
    held: deque[np.ndarray] = deque()
    free: list[np.ndarray] = []
    next_index, now = 0, 1_700_000_000 * SECOND
    seconds: list[float] = []
    relaid, reached = 0, False
    pools = [state.pool for state in engine._states if hasattr(state, "pool")]
    for _ in range(calls):
        if free:
            keys = np.sort(free.pop())
        else:
            keys = np.arange(next_index, next_index + per_batch, dtype=np.int64)
            next_index += per_batch
        columns = [pool.columns["p"] for pool in pools]
        now += SECOND // 200
        started = time.perf_counter()
        engine.process(keys, np.full(per_batch, now, np.int64), np.full(per_batch, 100.0), np.ones(per_batch))
        if sum(len(k) for k in held) + per_batch > population:
            gone = np.concatenate([held.popleft() for _ in range(evict_per_call // per_batch)])
            engine.evict(gone)
            free.extend(np.split(gone, len(gone) // per_batch))
            reached = True  # from here on new keys take freed indices: the tables stop growing
        elapsed = time.perf_counter() - started
        held.append(keys)
        if reached:
            seconds.append(elapsed)
            relaid += any(pool.columns["p"] is not column for pool, column in zip(pools, columns, strict=True))
    times = np.array(seconds) * 1e3
    table = Table(
        f"Engine under a flood of one-tick keys, 3 built-in signals: {population:,} keys held, {per_batch:,} new "
        f"keys per call, the oldest evicted {evict_per_call:,} at a time, indices reused",
        ["calls", "median ms", "p99 ms", "max ms", "calls over 5 ms", "calls that re-laid or grew the pool"],
    )
    table.add(
        f"{len(times):,}",
        f"{np.median(times):.2f}",
        f"{np.percentile(times, 99):.2f}",
        f"{times.max():.2f}",
        f"{np.count_nonzero(times > 5):,}",
        f"{relaid:,}",
    )
    table.notes.append("a call: Engine.process of the new keys' ticks, then Engine.evict when the population is full")
    return table


def growth_calls(before: str | None, population: int, per_batch: int = 1_000, rounds: int = 2) -> Table:
    """Engines fed ``population`` new keys, ``per_batch`` one-tick keys per call, none evicted: every
    call takes fresh indices, so the per-key tables and tick pools grow all the way. Contenders
    take turns, a fresh engine each per round; per contender, all its calls of all rounds."""
    factories: dict[str, Any] = {"this tree": lambda: Engine(list(DEFAULT_SIGNALS))}
    if before:
        old = engine_from_revision(before)
        factories[before] = lambda: old.Engine(list(DEFAULT_SIGNALS))
    times: dict[str, list[float]] = {name: [] for name in factories}
    faults: dict[str, int] = dict.fromkeys(factories, 0)
    for _ in range(rounds):
        for name, factory in factories.items():
            engine, now = factory(), 1_700_000_000 * SECOND
            first_fault = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for start in range(0, population, per_batch):
                keys = np.arange(start, start + per_batch, dtype=np.int64)
                now += SECOND // 200
                started = time.perf_counter()
                engine.process(keys, np.full(per_batch, now, np.int64), np.full(per_batch, 100.0), np.ones(per_batch))
                times[name].append(time.perf_counter() - started)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - first_fault
            del engine
    table = Table(
        f"Engine while the key population climbs to {population:,}: {per_batch:,} new one-tick keys per call, "
        f"3 built-in signals, none evicted; {rounds} rounds interleaved",
        ["engine", "calls", "median ms", "p99 ms", "max ms", "calls over 5 ms", "all calls s", "minor faults per call"],
    )
    for name, seconds in times.items():
        ms = np.array(seconds) * 1e3
        table.add(
            name,
            f"{len(ms):,}",
            f"{np.median(ms):.2f}",
            f"{np.percentile(ms, 99):.2f}",
            f"{ms.max():.1f}",
            f"{np.count_nonzero(ms > 5):,}",
            f"{ms.sum() / 1e3:.2f}",
            f"{faults[name] / len(ms):,.0f}",
        )
    table.notes.append(
        "growth: each table or pool that runs out of room is made larger; minor faults: first touches of new "
        "memory pages (getrusage), so a copy shows as a burst of them and a growth in place as a few per call"
    )
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.churn", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="200,000 keys instead of 2,000,000")
    parser.add_argument("--keys", type=int, help="distinct keys over the run (default 2,000,000)")
    parser.add_argument("--live", type=int, default=10_000, help="keys ticking at any moment")
    parser.add_argument("--ticks-per-key", type=int, default=20)
    parser.add_argument("--interval-s", type=float, default=1.0, help="simulated seconds between a key's ticks")
    parser.add_argument("--ttl-s", type=float, default=30.0, help="simulated seconds of silence before eviction")
    parser.add_argument("--step-s", type=float, default=0.1, help="simulated seconds per batch")
    parser.add_argument("--every", type=int, help="keys between two table rows (default keys / 20)")
    parser.add_argument("--baseline-keys", type=int, default=200_000, help="keys fed without eviction (0: skip)")
    parser.add_argument(
        "--flood-only", action="store_true", help="only the engine under a flood of one-tick keys (400,000 held)"
    )
    parser.add_argument("--growth-only", action="store_true", help="only the engine while the population grows")
    parser.add_argument("--before", help="git revision: also time its engine while the population grows")
    args = parser.parse_args(argv)
    args.keys = args.keys or (200_000 if args.quick else 2_000_000)
    args.every = args.every or max(1, args.keys // 20)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    population = 200_000 if args.quick else 1_000_000
    if args.growth_only:
        print_tables([growth_calls(args.before, population)])
        return 0
    flood = flood_calls(100_000 if args.quick else 400_000)
    if args.flood_only:
        print_tables([flood])
        return 0
    growth = growth_calls(args.before, population)
    plan = Plan(
        args.keys,
        args.live,
        args.ticks_per_key,
        int(args.interval_s * SECOND),
        int(args.ttl_s * SECOND),
        int(args.step_s * SECOND),
    )
    print(f"Machine: {machine_line(machine())}", flush=True)
    print(f"Engine path: {'compiled kernel' if KERNEL is not None else 'NumPy (kernel not built)'}\n", flush=True)
    timeline = Table(
        f"Key churn, 3 built-in signals: {plan.keys:,} keys, ~{plan.live:,} ticking at once, {plan.ticks_per_key} "
        f"ticks each {args.interval_s:g} s apart, evicted {args.ttl_s:g} s after their last tick "
        f"(~{plan.held:,} held), indices reused",
        ["keys started", "simulated s", "keys held", "engine MiB", "RSS MiB", "engine ns/tick"],
    )
    print(timeline.title + "\n" + "  ".join(timeline.columns), flush=True)
    run = simulate(plan, max(1, args.every // SAMPLES_PER_ROW), table=timeline)
    body = steady(plan, run.samples)
    keys_per_minute = 60 * SECOND / plan.gap_ns
    summary = Table(
        f"Growth after warm-up ({body[0].keys_started:,} to {body[-1].keys_started:,} keys started), least squares",
        [
            "measure",
            "bytes per million keys",
            "bytes per simulated minute",
            "min MiB",
            "max MiB",
            "first half max MiB",
            "second half max MiB",
        ],
    )
    for name, values in (
        ("engine memory_bytes()", [s.engine_bytes for s in body]),
        ("process RSS", [s.rss_bytes for s in body]),
    ):
        slope, half = slope_per_million_keys(body, values), len(values) // 2
        summary.add(
            name,
            f"{slope:,.0f}",
            f"{slope * keys_per_minute / 1e6:,.0f}",
            mib(min(values)),
            mib(max(values)),
            mib(max(values[:half])),
            mib(max(values[half:])),
        )
    summary.notes.append(
        f"{run.ticks:,} ticks in {run.wall_s:.1f} s of wall time; {run.evicted_keys:,} keys evicted in "
        f"{run.evict_calls:,} calls, {run.evict_seconds / max(run.evicted_keys, 1) * 1e9:,.0f} ns per key "
        f"({run.evict_seconds / max(run.evict_calls, 1) * 1e6:.0f} µs per call), compactions included"
    )
    tables = [summary]
    if args.baseline_keys:
        base_plan = Plan(
            min(args.baseline_keys, plan.keys),
            plan.live,
            plan.ticks_per_key,
            plan.interval_ns,
            plan.ttl_ns,
            plan.step_ns,
        )
        base = simulate(base_plan, max(1, base_plan.keys // 10), evict_indices=False)
        base_body = base.samples[len(base.samples) // 3 : -1]
        base_slope = slope_per_million_keys(base_body, [s.engine_bytes for s in base_body])
        base_values = [s.engine_bytes for s in base_body]
        summary.add(
            "without eviction: engine memory_bytes()",
            f"{base_slope:,.0f}",
            f"{base_slope * keys_per_minute / 1e6:,.0f}",
            mib(min(base_values)),
            mib(max(base_values)),
            "",
            "",
        )
        summary.notes.append(
            f"without eviction (a fresh index per key; first {base_plan.keys:,} keys fed): "
            f"{base_slope / 1e6:,.0f} bytes per key, {base_slope * plan.keys / 1e6 / 2**20:,.0f} MiB more at "
            f"{plan.keys:,} keys at that rate"
        )
    costs = eviction_cost(plan, repeats=5 if args.quick else 9)
    cost_table = Table(
        f"Engine.evict per call, engine holding {evict_bench_keys(plan):,} keys of "
        f"{plan.ticks_per_key} ticks; batch sizes interleaved",
        ["keys per call", "median µs", "median ns/key", "samples compacting", "median µs when compacting"],
    )
    for size, (plain, compacting) in costs.items():
        median = statistics.median(plain) if plain else float("nan")
        cost_table.add(
            f"{size:,}",
            f"{median * 1e6:.0f}",
            f"{median / size * 1e9:,.0f}",
            f"{len(compacting)} of {len(plain) + len(compacting)}",
            f"{statistics.median(compacting) * 1e6:,.0f}" if compacting else "",
        )
    cost_table.notes.append(
        "a sample is 1,000 keys' worth of calls (one call for 1,000 and 10,000); a compaction re-lays the live "
        "ticks once evictions left the pool mostly waste, paid for by the ticks freed"
    )
    tables.append(cost_table)
    tables += [flood, growth]
    print()
    print_tables(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
