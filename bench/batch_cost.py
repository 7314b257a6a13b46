"""Cost of one engine batch by size: the compiled kernel against the NumPy path.

``python -m bench.batch_cost [--quick] [--before REV]``

Both engines (and, with ``--before``, the engine module as it was at git revision REV) are warmed
on the same 300k ticks of the shared stream (10k Zipf keys, the three built-in signals), then fed
the same following batches, taking turns batch by batch, so the machine's noise hits every
contender alike. The table gives the median time per ``Engine.process`` call and ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.report import Table, machine, machine_line, print_tables
from bench.ticks import Ticks, generate
from streamd.config import DEFAULT_SIGNALS
from streamd.windows import KERNEL, Engine

ROOT = Path(__file__).resolve().parent.parent
SIZES = (1, 10, 50, 1_000, 10_000, 100_000)
WARM_TICKS = 300_000
N_KEYS = 10_000
TARGET_US = 100.0  # issue 8: at most 0.1 ms for a batch of 1 to 50 ticks
Process = Callable[[Ticks], object]


def git_show(revision: str, path: str) -> str | None:
    """A file's text at ``revision`` of this repository, None if it did not exist there."""
    command = ["git", "show", f"{revision}:{path}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    return result.stdout if result.returncode == 0 else None


def import_file(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def engine_from_revision(revision: str) -> ModuleType:
    """streamd/windows.py as it was at ``revision``, with the kernel compiled from that revision
    (into a temporary directory) when it had one, else none."""
    folder = Path(tempfile.mkdtemp())
    kernel_source = git_show(revision, "streamd/_kernel.c")
    kernel = None
    if kernel_source is not None:
        from setuptools import Distribution, Extension

        (folder / "_kernel.c").write_text(kernel_source)
        extension = Extension("_kernel", [str(folder / "_kernel.c")], extra_compile_args=["-ffp-contract=off"])
        build = Distribution({"ext_modules": [extension]}).get_command_obj("build_ext")
        build.build_lib = build.build_temp = str(folder)  # type: ignore[attr-defined]
        build.ensure_finalized()
        build.run()
        kernel = import_file("_kernel", next(folder.glob("_kernel*.so")))
    source = git_show(revision, "streamd/windows.py")
    assert source is not None, f"no streamd/windows.py at {revision}"
    (folder / "windows_before.py").write_text(source)
    module = import_file("bench_windows_before", folder / "windows_before.py")
    module.KERNEL = kernel
    return module


def contenders(before: str | None) -> dict[str, Process]:
    """Name -> a warmed engine's ``process`` bound to take a slice of ticks."""
    engines: dict[str, Any] = {}
    if before:
        old = engine_from_revision(before)
        if old.KERNEL is None:
            engines[f"{before} NumPy"] = old.Engine(DEFAULT_SIGNALS)
        else:
            engines[f"{before} NumPy"] = old.Engine(DEFAULT_SIGNALS, use_kernel=False)
            engines[f"{before} kernel"] = old.Engine(DEFAULT_SIGNALS)
    engines["NumPy path"] = Engine(DEFAULT_SIGNALS, use_kernel=False)
    if KERNEL is not None:
        engines["kernel"] = Engine(DEFAULT_SIGNALS)
    return {
        name: (lambda ticks, e=engine: e.process(ticks.keys, ticks.t, ticks.p, ticks.q))
        for name, engine in engines.items()
    }


def per_batch_times(ticks: Ticks, quick: bool, before: str | None) -> dict[str, dict[int, float]]:
    """Median seconds per call for each contender and batch size, contenders interleaved."""
    runners = contenders(before)
    for start in range(0, WARM_TICKS, 10_000):
        warm = ticks_slice(ticks, start, start + 10_000)
        for process in runners.values():
            process(warm)
    samples: dict[str, dict[int, list[float]]] = {name: {size: [] for size in SIZES} for name in runners}
    position = WARM_TICKS
    for size in SIZES:
        batches = max(9, min(400, 100_000 // size)) // (2 if quick else 1)
        for _ in range(batches):
            batch = ticks_slice(ticks, position, position + size)
            position += size
            for name, process in runners.items():
                started = time.perf_counter()
                process(batch)
                samples[name][size].append(time.perf_counter() - started)
    return {
        name: {size: statistics.median(values) for size, values in by_size.items()} for name, by_size in samples.items()
    }


def ticks_slice(ticks: Ticks, start: int, stop: int) -> Ticks:
    return Ticks(ticks.keys[start:stop], ticks.t[start:stop], ticks.p[start:stop], ticks.q[start:stop], ticks.n_keys)


def startup_costs() -> dict[str, float]:
    """Seconds, in a fresh interpreter: importing the kernel, and the first 10-tick batch per path."""
    script = """
import time
import streamd
t0 = time.perf_counter()
import streamd._kernel
t1 = time.perf_counter()
import numpy as np
from streamd.config import DEFAULT_SIGNALS
from streamd.windows import Engine
out = [t1 - t0]
for use_kernel in (False, True):
    engine = Engine(DEFAULT_SIGNALS, use_kernel=use_kernel)
    a = time.perf_counter()
    engine.process(np.arange(10), np.arange(10) * 1000, np.full(10, 100.5), np.ones(10))
    out.append(time.perf_counter() - a)
print(*out)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    kernel_import, numpy_first, kernel_first = map(float, result.stdout.split())
    return {"kernel import": kernel_import, "first batch, NumPy path": numpy_first, "first batch, kernel": kernel_first}


def run(quick: bool, before: str | None = None) -> dict[str, Any]:
    ticks = generate(WARM_TICKS + sum(max(9, min(400, 100_000 // size)) * size for size in SIZES), N_KEYS)
    times = per_batch_times(ticks, quick, before)
    names = list(times)
    reference = "NumPy path"
    table = Table(
        f"Engine.process per batch: {N_KEYS:,} keys, the 3 built-in signals, warmed on {WARM_TICKS:,} ticks; "
        "median µs per call, contenders interleaved (ratio < 1: faster than the NumPy path)",
        ["batch ticks", *names, *(f"{name} / {reference}" for name in names if name != reference), "target"],
    )
    for size in SIZES:
        cells = [f"{times[name][size] * 1e6:.1f}" for name in names]
        ratios = [f"{times[name][size] / times[reference][size]:.2f}" for name in names if name != reference]
        table.add(f"{size:,}", *cells, *ratios, f"<= {TARGET_US:.0f} µs" if size <= 50 else "")
    startup = startup_costs() if KERNEL is not None else {}
    table.notes += [f"{what}: {seconds * 1e6:.0f} µs (fresh interpreter)" for what, seconds in startup.items()]
    if KERNEL is None:
        table.notes.append("streamd/_kernel.c is not built: only the NumPy path was measured")
    table.data = {"seconds": times, "startup_seconds": startup}
    return {"title": "Engine batch cost", "tables": [table]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch_cost", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="half as many batches per size")
    parser.add_argument("--before", help="also time streamd/windows.py as it was at this git revision")
    args = parser.parse_args(argv)
    print(f"Machine: {machine_line(machine())}\n", flush=True)
    print_tables(run(args.quick, args.before)["tables"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
