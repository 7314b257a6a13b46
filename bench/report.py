"""Medians, PASS/MISS verdicts, result tables (text and Markdown), JSON and the docs page."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOCS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:results:begin -->", "<!-- bench:results:end -->"


@dataclass
class Table:
    """One results table; ``rows`` hold display values, ``data`` the raw numbers behind them."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, *cells: object) -> None:
        self.rows.append([str(cell) for cell in cells])

    def text(self) -> str:
        widths = [
            max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c) for i, c in enumerate(self.columns)
        ]
        line = "  ".join(c.ljust(w) for c, w in zip(self.columns, widths, strict=True))
        out = [self.title, line, "  ".join("-" * w for w in widths)]
        out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in self.rows]
        out += [f"  * {note}" for note in self.notes]
        return "\n".join(out)

    def markdown(self) -> str:
        out = [f"#### {self.title}", "", "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            out.append("")
            out += [f"- {note}" for note in self.notes]
        return "\n".join(out)


def median_of(runs: int, measure: Callable[[], float]) -> tuple[float, list[float]]:
    """Run ``measure`` ``runs`` times; return the median and every sample."""
    samples = [measure() for _ in range(runs)]
    return statistics.median(samples), samples


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def verdict(value: float, target: float, *, higher_is_better: bool = True) -> str:
    """``PASS`` or ``MISS`` with how far off, e.g. ``MISS (0.62x of target)``."""
    if math.isnan(value):  # not measured
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    if ok:
        return "PASS"
    factor = value / target if target else float("inf")
    return f"MISS ({factor:.2f}x of target)"


def rate(value: float) -> str:
    """Human ticks/s: 5.21 M, 812 k."""
    if math.isnan(value):
        return "n/a"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return f"{value:.0f}"


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:
        return "not installed"


def machine() -> dict[str, Any]:
    """CPU model, cores and the versions that matter, for the results header."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, cwd=DOCS_PAGE.parent
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "pyzmq": _version("zmq"),
        "libzmq": __import__("zmq").zmq_version(),
        "msgpack": ".".join(map(str, __import__("msgpack").version)),
        "pandas": _version("pandas"),
        "bytewax": _bytewax_version(),
        "streamd": _version("streamd"),
        "commit": commit,
        "kernel": platform.release(),
    }


def _bytewax_version() -> str:
    try:
        from importlib.metadata import version

        return version("bytewax")
    except Exception:
        return "not installed"


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"{info['cpu']}, {info['cores']} cores; Python {info['python']}, numpy {info['numpy']}, "
        f"pyzmq {info['pyzmq']} (libzmq {info['libzmq']}), msgpack {info['msgpack']}, pandas {info['pandas']}, "
        f"bytewax {info['bytewax']}; streamd {info['streamd']} at {info['commit'] or '?'}"
    )


def save(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, Table):
        return asdict(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    msg = f"not JSON serialisable: {type(value).__name__}"
    raise TypeError(msg)


def markdown_results(results: dict[str, Any]) -> str:
    """The generated part of docs/benchmarks.md: header plus every section's tables."""
    info = results["machine"]
    out = [
        f"Measured {results['finished']} with `{results['command']}` "
        f"({'quick' if results['quick'] else 'full'} mode, {results['elapsed_s']:.0f} s).",
        "",
        f"Machine: {machine_line(info)}.",
        "",
        f"Load average (1/5/15 min) at start {_load(info, 'start')}, at end {_load(info, 'end')} "
        "(other work shares the machine).",
        "",
    ]
    for section in results["sections"].values():
        out.append(f"### {section['title']}")
        out.append("")
        for table in section["tables"]:
            out.append(table.markdown() if isinstance(table, Table) else Table(**table).markdown())
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _load(info: dict[str, Any], when: str) -> str:
    values = info.get(f"load_average_at_{when}")
    return "/".join(f"{v:.1f}" for v in values) if values else "?"


def update_docs(results: dict[str, Any], page: Path = DOCS_PAGE) -> bool:
    """Replace the generated block of the docs page; False when the page has no markers."""
    if not page.exists():
        return False
    text = page.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    page.write_text(f"{head}{BEGIN}\n{markdown_results(results)}{END}{tail}")
    return True


def print_tables(tables: Sequence[Table]) -> None:
    for table in tables:
        print(table.text(), flush=True)
        print(flush=True)
