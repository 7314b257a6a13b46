"""The generated tick stream shared by every contender, and section 1: what that stream looks like.

Seeded random walks with keys drawn uniformly or from a Zipf law. Users' keys are symbols, so the
daemon sections send string keys (``"S0000042"``, see :func:`symbols`); dense integer keys are only
a separately labelled variant. The section table shows why the key type and the number of distinct
keys per batch matter: both set the decode cost per tick and the rows each batch produces.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from bench.report import Table
from streamd.protocol import encode_columnar_bin

SEED = 20240425
ZIPF_EXPONENT = 1.1
START_NS = 1_700_000_000_000_000_000
SYMBOL_DIGITS = 7


@dataclass(frozen=True)
class Ticks:
    """Columns of a tick stream in arrival order; ``keys`` are dense ids ``0..n_keys-1``."""

    keys: np.ndarray  # int64 key ids (the engine's dense slots when used in process)
    t: np.ndarray  # int64 ns, non-decreasing overall (so never late per key)
    p: np.ndarray  # float64
    q: np.ndarray  # float64
    n_keys: int

    def __len__(self) -> int:
        return len(self.keys)

    def head(self, n: int) -> Ticks:
        return Ticks(self.keys[:n], self.t[:n], self.p[:n], self.q[:n], self.n_keys)

    def wire_keys(self, key_type: str) -> list[str | int]:
        """Each tick's key as a feed sends it: a symbol string (``"str"``) or the integer id (``"int"``)."""
        if key_type == "int":
            ids: list[str | int] = self.keys.tolist()
            return ids
        names: list[str | int] = symbols(self.n_keys)[self.keys].tolist()
        return names


def symbols(n_keys: int) -> np.ndarray:
    """Symbol strings ``S0000000 .. S{n_keys-1}`` (8 characters, like an exchange symbol), as an object array."""
    return np.array([f"S{i:0{SYMBOL_DIGITS}d}" for i in range(n_keys)], dtype=object)


def feed_part(key: str | int, parts: int) -> int:
    """Which of ``parts`` feed processes (and so which ingest endpoint) sends ``key``.

    A stable hash, salted so that it is independent of the daemon's own key -> worker hash
    (:func:`streamd.sharding.shard_for`): with the same hash, 2 endpoints and 2 workers, every
    endpoint's ingest would feed only one worker.
    """
    data = key.encode() if isinstance(key, str) else key.to_bytes(8, "little", signed=True)
    digest = hashlib.blake2b(data, digest_size=8, person=b"bench-feed").digest()
    return int.from_bytes(digest, "little") % parts


def zipf_keys(rng: np.random.Generator, n: int, n_keys: int, exponent: float = ZIPF_EXPONENT) -> np.ndarray:
    """``n`` draws from a Zipf law over ``n_keys`` ranks, ranks shuffled to key ids."""
    weights = 1.0 / np.arange(1, n_keys + 1) ** exponent
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, rng.random(n), side="right")
    ranks = np.minimum(ranks, n_keys - 1)
    return rng.permutation(n_keys)[ranks].astype(np.int64)


def generate(n: int, n_keys: int, events_per_s: float = 100_000.0, seed: int = SEED, uniform: bool = False) -> Ticks:
    """``n`` ticks over ``n_keys`` keys at a mean event-time rate of ``events_per_s``.

    Each key's price is its own random walk (steps of 0.01 around 100, plus a per-key level);
    event times grow by exponential gaps, so a 1 s window holds about ``events_per_s`` ticks.
    """
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, n_keys, n, dtype=np.int64) if uniform else zipf_keys(rng, n, n_keys)
    gaps = rng.exponential(1e9 / events_per_s, n).astype(np.int64)
    t = START_NS + np.cumsum(gaps)
    steps = rng.choice(np.array([-0.01, 0.0, 0.01]), n)
    order = np.argsort(keys, kind="stable")
    walk = np.cumsum(steps[order])
    sorted_keys = keys[order]
    first = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    counts = np.diff(np.r_[first, n])
    walk -= np.repeat(walk[first] - steps[order][first], counts)  # each key's walk starts at its own level
    level = 100.0 + rng.integers(0, 100, n_keys)
    p = np.empty(n)
    p[order] = np.round(level[sorted_keys] + walk, 2)
    q = rng.integers(1, 101, n).astype(np.float64)
    return Ticks(keys, t, p, q, n_keys)


# -- section 1: the streams ------------------------------------------------------------------

STREAMS = (
    # (key type, keys, uniform)
    ("str", 10_000, False),
    ("str", 10_000, True),
    ("str", 100_000, False),
    ("str", 100_000, True),
    ("int", 10_000, False),
    ("int", 100_000, True),
)
MESSAGE_TICKS = 1_000


def distinct_per_batch(keys: np.ndarray, batch: int) -> float:
    """Median number of distinct keys in consecutive batches of ``batch`` ticks."""
    return statistics.median(len(np.unique(keys[s : s + batch])) for s in range(0, len(keys) - batch + 1, batch))


def unpack_ns_per_tick(payloads: list[bytes], ticks_per_payload: int) -> float:
    """In-process ``msgpack.unpackb`` cost per tick (median of 3 passes over ``payloads``, after a warm-up)."""
    passes = []
    for _ in range(4):
        start = time.perf_counter()
        for payload in payloads:
            msgpack.unpackb(payload)
        passes.append(time.perf_counter() - start)
    return statistics.median(passes[1:]) / (len(payloads) * ticks_per_payload) * 1e9


def describe_stream(key_type: str, n_keys: int, uniform: bool, n: int) -> dict[str, Any]:
    start = time.perf_counter()
    ticks = generate(n, n_keys, uniform=uniform)
    keys = ticks.wire_keys(key_type)
    generate_s = time.perf_counter() - start
    t, p, q = ticks.t.tolist(), ticks.p.tolist(), ticks.q.tolist()
    chunks = [slice(s, s + MESSAGE_TICKS) for s in range(0, min(n, 100 * MESSAGE_TICKS), MESSAGE_TICKS)]
    maps = [msgpack.packb({"k": keys[i], "t": t[i], "p": p[i], "q": q[i]}) for i in range(chunks[-1].stop)]
    lists = [msgpack.packb({"k": keys[c], "t": t[c], "p": p[c], "q": q[c]}) for c in chunks]
    bins = [encode_columnar_bin(keys[c], ticks.t[c], ticks.p[c], ticks.q[c]) for c in chunks]
    return {
        "key_type": key_type,
        "keys": n_keys,
        "distribution": "uniform" if uniform else f"Zipf {ZIPF_EXPONENT}",
        "ticks": n,
        "generate_s": generate_s,
        "distinct_per_1k": distinct_per_batch(ticks.keys, 1_000),
        "distinct_per_10k": distinct_per_batch(ticks.keys, 10_000),
        "busiest_share": float(np.bincount(ticks.keys).max() / n),
        "bytes_per_tick": {
            "map": statistics.mean(map(len, maps)),
            "list": statistics.mean(map(len, lists)) / MESSAGE_TICKS,
            "bin": statistics.mean(map(len, bins)) / MESSAGE_TICKS,
        },
        "unpack_ns_per_tick": {
            "map": unpack_ns_per_tick(maps, 1),
            "list": unpack_ns_per_tick(lists, MESSAGE_TICKS),
            "bin": unpack_ns_per_tick(bins, MESSAGE_TICKS),
        },
    }


def run(quick: bool, earlier: dict[str, Any]) -> dict[str, Any]:
    n = 200_000 if quick else 1_000_000
    table = Table(
        f"Generated tick streams ({n:,} ticks each): keys per batch, bytes and msgpack decode cost per tick",
        [
            "keys",
            "key type",
            "distribution",
            "generate s",
            "distinct keys / 1k ticks",
            "/ 10k ticks",
            "busiest key",
            "bytes/tick map / list / bin",
            "unpackb ns/tick map / list / bin",
        ],
    )
    rows = [describe_stream(key_type, n_keys, uniform, n) for key_type, n_keys, uniform in STREAMS]
    for row in rows:
        label = "string (headline)" if row["key_type"] == "str" else "integer (variant only)"
        table.add(
            f"{row['keys']:,}",
            label,
            row["distribution"],
            f"{row['generate_s']:.2f}",
            f"{row['distinct_per_1k']:.0f}",
            f"{row['distinct_per_10k']:.0f}",
            f"{row['busiest_share']:.2%}",
            " / ".join(f"{row['bytes_per_tick'][f]:.1f}" for f in ("map", "list", "bin")),
            " / ".join(f"{row['unpack_ns_per_tick'][f]:.0f}" for f in ("map", "list", "bin")),
        )
    table.notes += [
        f'String keys are symbols "S" + {SYMBOL_DIGITS} digits; integer keys are the dense ids 0..keys-1 '
        "(what the old benchmark sent, kept only as a labelled variant: they flatter the daemon).",
        f"bytes/tick: map = one single-tick message; list and bin = columnar messages of {MESSAGE_TICKS:,} ticks. "
        "unpackb = plain msgpack.unpackb in this process, median of 3 passes (after a warm-up) over up to 100 messages "
        "(the least any receiver must spend before it can look at a tick).",
        "generate s = NumPy generation plus turning ids into wire keys (symbols for string keys).",
    ]
    table.data = {f"{r['key_type']}-{r['keys']}-{r['distribution']}": r for r in rows}
    return {"title": "1. Tick streams", "tables": [table]}
