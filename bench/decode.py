"""Section 5: the ingest's CPU path per flush, in one process: decode + validate + route + split per worker.

Each case pre-encodes a few flushes of one wire form and times, interleaved in one process, two
contenders on the same payloads: the floor (a bare ``msgpack.unpackb`` loop over the payloads)
and streamd (``decode_payloads(payloads, router.codes)`` then ``router.split``, as the ingest
does per flush). The router has seen every key before (steady state). No sockets: receive cost
is left out on purpose, so that the ratio shows what the ingest adds per tick.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import msgpack

from bench.report import Table, rate, verdict
from bench.ticks import generate
from streamd.protocol import decode_payloads, encode_columnar_bin
from streamd.router import KeyRouter, Outbox

WORKERS = 2  # one per core on the reference box
COLUMNAR_BATCH = 1_000  # ticks per columnar payload
COLUMNAR_FLUSH = 64  # columnar payloads per flush (the daemon flushes at 4 MiB or 10,000 messages)
MAP_FLUSH = 10_000  # single-tick payloads per flush (latency.max_batch_size)
FLUSHES = 3  # distinct flushes per timed sample, so no flush is measured only hot in cache
LIST_RATIO_TARGET = 0.5
BIN_RATE_TARGET = 5e6
MAP_RATIO_TARGET = 0.5


def key_name(key_id: int) -> str:
    """A symbol-like string key, e.g. ``S2K00042``."""
    return f"S{key_id % 10}K{key_id:05d}"


def tick_columns(n: int, n_keys: int, uniform: bool, int_keys: bool, seed: int) -> tuple[list[Any], ...]:
    ticks = generate(n, n_keys, seed=seed, uniform=uniform)
    ids = ticks.keys.tolist()
    keys = ids if int_keys else [key_name(k) for k in ids]
    return keys, ticks.t.tolist(), ticks.p.tolist(), ticks.q.tolist()


def encode_flush(form: str, n_keys: int, uniform: bool, int_keys: bool, seed: int) -> list[bytes]:
    """One flush of payloads: single-tick maps, or columnar batches with list or bin columns."""
    n = MAP_FLUSH if form == "map" else COLUMNAR_FLUSH * COLUMNAR_BATCH
    keys, t, p, q = tick_columns(n, n_keys, uniform, int_keys, seed)
    if form == "map":
        return [msgpack.packb({"k": k, "t": ti, "p": pi, "q": qi}) for k, ti, pi, qi in zip(keys, t, p, q, strict=True)]
    payloads = []
    for start in range(0, n, COLUMNAR_BATCH):
        chunk = slice(start, start + COLUMNAR_BATCH)
        if form == "bin":
            payloads.append(encode_columnar_bin(keys[chunk], t[chunk], p[chunk], q[chunk]))
        else:
            payloads.append(msgpack.packb({"k": keys[chunk], "t": t[chunk], "p": p[chunk], "q": q[chunk]}))
    return payloads


def unpack_loop(payloads: list[bytes]) -> None:
    """The floor: what a consumer that only unpacks each payload pays."""
    unpackb = msgpack.unpackb
    for payload in payloads:
        unpackb(payload)


def streamd_flush(router: KeyRouter, outboxes: list[Outbox]) -> Callable[[list[bytes]], None]:
    """What the ingest does with one flush, short of sending: decode, then split per worker."""

    def run(payloads: list[bytes]) -> None:
        router.split(decode_payloads(payloads, router.codes), outboxes)
        for worker, outbox in enumerate(outboxes):
            router.admit(worker, outbox, len(outbox.fresh_keys))
            outbox.new_keys.clear()

    return run


def measure(
    flushes: list[list[bytes]], contenders: dict[str, Callable[[list[bytes]], None]], runs: int
) -> dict[str, float]:
    """Median ticks/s of each contender; samples interleaved so load on the box hits all alike."""
    ticks = sum(decode_payloads(flush).received for flush in flushes)
    for contender in contenders.values():
        for flush in flushes:
            contender(flush)  # warm-up: the router learns every key here
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, contender in contenders.items():
            start = time.perf_counter()
            for flush in flushes:
                contender(flush)
            samples[name].append(ticks / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


CASES = (  # form, keys, uniform, int keys
    ("list", 10_000, True, False),
    ("list", 10_000, False, False),
    ("list", 100_000, True, False),
    ("list", 100_000, False, False),
    ("bin", 10_000, True, False),
    ("bin", 10_000, False, False),
    ("bin", 100_000, True, False),
    ("bin", 100_000, False, False),
    ("map", 10_000, True, False),
    ("map", 10_000, False, False),
    ("map", 100_000, False, False),
    ("list", 10_000, False, True),
    ("bin", 10_000, False, True),
    ("map", 10_000, False, True),
)


def target_of(form: str, int_keys: bool, floor: float, ours: float) -> tuple[str, str]:
    if int_keys:
        return "", ""
    if form == "bin":
        return f">= {rate(BIN_RATE_TARGET)} ticks/s", verdict(ours, BIN_RATE_TARGET)
    goal = LIST_RATIO_TARGET if form == "list" else MAP_RATIO_TARGET
    return f">= {goal}x floor", verdict(ours / floor, goal)


def run(quick: bool, earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    runs = 5 if quick else 15
    table = Table(
        f"Ingest CPU path per flush, one process: bare unpackb loop (floor) vs streamd decode + route + split "
        f"({WORKERS} workers); median of {runs} interleaved samples",
        ["payloads", "keys", "floor ticks/s", "streamd ticks/s", "ratio", "target", "verdict"],
    )
    data: dict[str, Any] = {}
    for index, (form, n_keys, uniform, int_keys) in enumerate(CASES):
        flushes = [encode_flush(form, n_keys, uniform, int_keys, seed=index * 10 + i) for i in range(FLUSHES)]
        router = KeyRouter(WORKERS)
        outboxes = [Outbox() for _ in range(WORKERS)]
        result = measure(flushes, {"floor": unpack_loop, "streamd": streamd_flush(router, outboxes)}, runs)
        floor, ours = result["floor"], result["streamd"]
        keys = f"{n_keys:,} {'int' if int_keys else 'str'} {'uniform' if uniform else 'Zipf'}"
        what = {"list": "columnar, list columns", "bin": "columnar, bin columns", "map": "single-tick maps"}[form]
        table.add(what, keys, rate(floor), rate(ours), f"{ours / floor:.2f}x", *target_of(form, int_keys, floor, ours))
        data[f"{form} {keys}"] = {"floor": floor, "streamd": ours}
    table.notes += [
        f"Columnar flushes: {COLUMNAR_FLUSH} payloads of {COLUMNAR_BATCH:,} ticks; map flushes: {MAP_FLUSH:,} "
        f"payloads of one tick; {FLUSHES} distinct flushes per sample. String keys look like `S2K00042`; "
        "Zipf exponent 1.1. t is int nanoseconds, p and q floats, as the daemon bench sends them.",
        "streamd = `router.split(decode_payloads(payloads, router.codes), outboxes)` with every key already "
        "routed; floor = `for payload in payloads: msgpack.unpackb(payload)`. No sockets in either.",
        "Integer-key rows are for comparison only (no target).",
    ]
    table.data = data
    return {"title": "5. Ingest decode path", "tables": [table]}
