"""``python -m bench [--quick] [--only SECTION,...]``: run, print, save, update docs.

Sections run in order and each gets the results of the ones before it (``model`` reads ``stages``
and ``daemon`` from the same run when they ran).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any

from bench.report import RESULTS_DIR, Table, machine, machine_line, print_tables, save, update_docs

SECTIONS = ("ticks", "engine", "decode", "daemon", "latency", "stages", "model", "scaling")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and shorter steps (~3 minutes)")
    parser.add_argument("--only", default="", help=f"comma-separated sections to run: {', '.join(SECTIONS)}")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the results block of docs/benchmarks.md")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    args.sections = chosen
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench" + (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "")
    info = machine()
    info["load_average_at_start"] = os.getloadavg()
    print(f"{command}\nMachine: {machine_line(info)}\n", flush=True)
    started = time.perf_counter()
    sections: dict[str, Any] = {}
    for name in args.sections:
        section_start = time.perf_counter()
        print(f"== {name} ==", flush=True)
        module = importlib.import_module(f"bench.{name}")
        result = module.run(args.quick, sections)
        result["elapsed_s"] = time.perf_counter() - section_start
        sections[name] = result
        print_tables(result["tables"])
        print(f"({name}: {result['elapsed_s']:.0f} s)\n", flush=True)
    info["load_average_at_end"] = os.getloadavg()
    results = {
        "command": command,
        "quick": args.quick,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "elapsed_s": time.perf_counter() - started,
        "machine": info,
        "sections": sections,
    }
    name = "latest-quick.json" if args.quick else "latest.json"
    if args.only:
        name = f"latest{'-quick' if args.quick else ''}-{'-'.join(args.sections)}.json"
    path = RESULTS_DIR / name
    save(results, path)
    print(f"results: {path}", flush=True)
    if not args.no_docs and not args.only and update_docs(json.loads(path.read_text()) | {"sections": sections}):
        print("docs/benchmarks.md updated", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["Table", "main"]
