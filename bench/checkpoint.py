"""What a checkpoint costs, and how fast a replacement worker catches up.

``python -m bench.checkpoint [--quick] [--dir PATH]``

An engine with the three built-in signals is filled with ``--keys`` keys (time windows of 1 s
holding ``--ticks-per-key`` ticks each); then, interleaved over ``--runs`` rounds, the table
measures each step of a checkpoint: the copy of the state (``Engine.export_state`` plus the
key list: all the worker's loop pays, the rest runs on a background thread), encoding with its
CRC-32, writing with fsync and rename, reading and decoding, and ``Engine.restore``. Each as a
median, in ms and in ms per MB of checkpoint. Then the replay: journal ticks merged into
10,000-tick batches and applied by the engine, as a replacement worker does (ticks/s).
``--dir`` should be on the disk that ``state.dir`` will use (default: the system temp dir).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np

from bench.report import Table, machine, machine_line, print_tables
from streamd.checkpoint import Checkpoint, decode, encode
from streamd.config import DEFAULT_SIGNALS
from streamd.journal import JournalEntry, ReplayJournal
from streamd.persistence import checkpoint_path, write_atomically
from streamd.windows import KERNEL, Engine

SECOND = 1_000_000_000


def filled_engine(keys: int, ticks_per_key: int, seed: int = 0) -> tuple[Engine, int]:
    """An engine whose 1 s windows hold about ``ticks_per_key`` ticks per key; returns it and the next time."""
    engine = Engine(DEFAULT_SIGNALS)
    rng = np.random.default_rng(seed)
    t = 0
    step = SECOND // ticks_per_key
    for _ in range(ticks_per_key + 2):
        slots = rng.permutation(keys)
        engine.process(slots, t + np.arange(keys, dtype=np.int64) % step, 100 + rng.normal(0, 1, keys), np.ones(keys))
        t += step
    return engine, t


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def checkpoint_table(keys: int, ticks_per_key: int, runs: int, directory: str) -> Table:
    engine, _ = filled_engine(keys, ticks_per_key)
    names = np.array([f"KEY{i:07d}" for i in range(keys)], dtype=object)
    holder: dict[str, object] = {}

    def copy() -> None:
        holder["checkpoint"] = Checkpoint(
            0, 1, "bench", (0,), time.time_ns(), 0, False, tuple(names), engine.export_state()
        )

    def encoded() -> None:
        holder["pieces"] = encode(holder["checkpoint"])  # type: ignore[arg-type]

    path = checkpoint_path(directory, 0, 1)

    def write() -> None:
        holder["bytes"] = write_atomically(path, holder["pieces"])  # type: ignore[arg-type]

    def read() -> None:
        holder["decoded"] = decode(path.read_bytes())

    def restore() -> None:
        decoded: Checkpoint = holder["decoded"]  # type: ignore[assignment]
        Engine(DEFAULT_SIGNALS).restore([(decoded.state, np.arange(len(decoded.keys)))])

    steps = {
        "copy state + keys (worker loop)": copy,
        "encode + CRC-32 (background)": encoded,
        "write + fsync + rename (background)": write,
        "read + decode (start-up)": read,
        "Engine.restore (start-up)": restore,
    }
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(runs):
        for name, step in steps.items():
            samples[name].append(timed(step))
    megabytes = int(holder["bytes"]) / 1e6  # type: ignore[call-overload]
    table = Table(
        f"Checkpoint of {keys:,} keys, ~{ticks_per_key} ticks per 1 s window: {megabytes:.1f} MB"
        f" (engine state {engine.memory_bytes() / 1e6:.1f} MB), median of {runs}",
        ["step", "ms", "ms per MB"],
    )
    for name, values in samples.items():
        median = statistics.median(values)
        table.add(name, f"{median * 1e3:.1f}", f"{median * 1e3 / megabytes:.2f}")
    return table


def replay_table(keys: int, ticks: int, runs: int) -> Table:
    engine, t = filled_engine(keys, 10)
    rng = np.random.default_rng(1)
    journal = ReplayJournal(limit_bytes=1 << 40)
    for seq in range(0, ticks, 100):
        n = min(100, ticks - seq)
        times = t + np.arange(seq, seq + n, dtype=np.int64) * 1000
        journal.record(JournalEntry(seq, rng.integers(0, keys, n), times, 100 + rng.normal(0, 1, n), np.ones(n)))
    state = engine.export_state()
    rates = []
    for _ in range(runs):
        replica = Engine(DEFAULT_SIGNALS)
        replica.restore([(state, np.arange(keys))])
        started = time.perf_counter()
        for entry in journal.replay(10_000):
            replica.process(entry.slots, entry.t, entry.p, entry.q)
        rates.append(ticks / (time.perf_counter() - started))
    table = Table(
        f"Replay of {ticks:,} journalled ticks (batches of 100 merged into 10,000) over {keys:,} keys",
        ["engine", "ticks/s (median)"],
    )
    table.add("c-kernel" if KERNEL is not None else "numpy", f"{statistics.median(rates):,.0f}")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dir", default=None, help="where to write (the disk of state.dir)")
    args = parser.parse_args(argv)
    print(f"python -m bench.checkpoint{' --quick' if args.quick else ''}\nMachine: {machine_line(machine())}\n")
    sizes = [(10_000, 20), (100_000, 20)] if args.quick else [(10_000, 20), (100_000, 20), (100_000, 100)]
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        tables = [checkpoint_table(keys, per_key, 3 if args.quick else 7, directory) for keys, per_key in sizes]
    tables.append(replay_table(10_000, 200_000 if args.quick else 1_000_000, 3 if args.quick else 5))
    print_tables(tables)


if __name__ == "__main__":
    main()
