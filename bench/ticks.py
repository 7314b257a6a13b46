"""The generated tick stream shared by every contender: seeded, Zipf-skewed keys, random walks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEED = 20240425
ZIPF_EXPONENT = 1.1
START_NS = 1_700_000_000_000_000_000


@dataclass(frozen=True)
class Ticks:
    """Columns of a tick stream in arrival order; ``keys`` are dense ints ``0..n_keys-1``."""

    keys: np.ndarray  # int64
    t: np.ndarray  # int64 ns, non-decreasing overall (so never late per key)
    p: np.ndarray  # float64
    q: np.ndarray  # float64
    n_keys: int

    def __len__(self) -> int:
        return len(self.keys)

    def head(self, n: int) -> Ticks:
        return Ticks(self.keys[:n], self.t[:n], self.p[:n], self.q[:n], self.n_keys)


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
