"""Section (b): a cost model that predicts N-core throughput from the per-stage figures of section (a).

    throughput(N cores, E endpoints) = min(
        E x ingest capacity,                      one ingest process per endpoint
        W x worker capacity,                      W = N workers (``workers.count = 0``: one per core)
        forwarder capacity / messages per tick,   the supervisor's one forwarder thread
        N / CPU seconds per tick of all of them,  the processes share the N cores
    )

Worker capacity is engine + publishing per tick (both run in the worker), at one batch size; the
forwarder moves one message per record (record mode) or per signal per batch (batch mode). The
ingest capacity comes from section (a) once its hook is filled in; until then from
``--ingest-capacity`` or from the ingest CPU per tick that section (c) read from /metrics.

Standalone: ``python -m bench.model [--results FILE] [--ingest-capacity TICKS_PER_S] [--batch N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import RESULTS_DIR, Table, print_tables, rate

MODEL_FEED = "10,000 keys, Zipf"
MODEL_FORM = "list"
MODEL_BATCH = 1_000  # 1 ms of ~1M ticks/s over 2 workers; a backlogged worker merges up to 10,000 and more
CHECK_BATCHES = (1_000, 10_000)
CORES = (4, 8, 16)
ENDPOINTS = (1, 4)
PUBLISH_MODES = ("batch", "record")
END_TO_END_CASE = "list-str-10000-zipf-{mode}-1ep"  # section (c)'s case the 2-core prediction is checked against


@dataclass(frozen=True)
class StageCosts:
    """CPU seconds per input tick in each stage (on one core); ``ingest`` is None when unknown."""

    ingest: float | None
    worker: float
    forwarder: float
    ingest_source: str


def stage_costs(figures: dict[str, Any], mode: str, batch: int, ingest: tuple[float, str] | None) -> StageCosts:
    worker = figures["worker"][f"{MODEL_FEED}|{batch}"]
    messages_per_tick = worker["messages_per_tick"][mode]
    ingest_cost = 1 / ingest[0] if ingest else None
    return StageCosts(
        ingest=ingest_cost,
        worker=worker["engine_s_per_tick"] + worker["publish_s_per_tick"][mode],
        forwarder=messages_per_tick / figures["forwarder_messages_per_s"],
        ingest_source=ingest[1] if ingest else "not modelled",
    )


def predict(costs: StageCosts, cores: int, endpoints: int, harness_cpu: float = 0.0) -> dict[str, Any]:
    """Predicted ticks/s and the limiting term. ``harness_cpu``: CPU s/tick of load generators and
    subscribers sharing the same cores (only for checking against a measurement on this box)."""
    capacities = {"workers": cores / costs.worker, "forwarder": 1 / costs.forwarder}
    if costs.ingest is not None:
        capacities["ingest"] = endpoints / costs.ingest
    total = costs.worker + costs.forwarder + (costs.ingest or 0.0) + harness_cpu
    capacities["all cores"] = cores / total
    limit = min(capacities, key=lambda name: capacities[name])
    shares = {"workers": costs.worker, "forwarder": costs.forwarder, "ingest": costs.ingest or 0.0}
    return {
        "ticks_per_s": capacities[limit],
        "limited_by": limit,
        "capacities": capacities,
        "cpu_share": {name: cost / total for name, cost in shares.items()},
    }


# -- where the inputs come from ----------------------------------------------------------------------


def table_data(section: dict[str, Any], index: int) -> dict[str, Any]:
    """A table's ``data`` whether the section is in memory (Table objects) or read back from JSON."""
    table = section["tables"][index]
    data: dict[str, Any] = table["data"] if isinstance(table, dict) else table.data
    return data


def end_to_end(sections: dict[str, Any], mode: str) -> dict[str, Any] | None:
    """Section (c)'s record of the case the model is checked against, if it ran."""
    if "daemon" not in sections:
        return None
    case: dict[str, Any] | None = table_data(sections["daemon"], 0).get(END_TO_END_CASE.format(mode=mode))
    return case


def ingest_capacity(sections: dict[str, Any], given: float | None) -> tuple[float, str] | None:
    """Ingest ticks/s per core: section (a)'s hook, else ``given``, else section (c)'s CPU per tick."""
    measured = sections.get("stages", {}).get("figures", {}).get("ingest_ticks_per_s")
    if measured:
        return measured[MODEL_FORM], "section (a), ingest into null workers"
    if given:
        return given, "given (--ingest-capacity)"
    for mode in PUBLISH_MODES:
        case = end_to_end(sections, mode)
        if case and case.get("at_sustained"):
            per_tick = case["at_sustained"]["cpu_s_per_tick"]["ingest"]
            return 1 / per_tick, f"section (c): ingest CPU per tick at the sustained rate ({mode} case)"
    return None


def latest_sections() -> dict[str, Any]:
    """Sections of the newest results file that has section (a) in it."""
    files = sorted(RESULTS_DIR.glob("latest*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in files:
        sections: dict[str, Any] = json.loads(path.read_text()).get("sections", {})
        if "stages" in sections:
            return sections
    msg = f"no results with section 'stages' in {RESULTS_DIR}: run python -m bench --only stages first"
    raise FileNotFoundError(msg)


# -- tables --------------------------------------------------------------------------------------------


def prediction_table(sections: dict[str, Any], batch: int, ingest: tuple[float, str] | None) -> Table:
    figures = sections["stages"]["figures"]
    table = Table(
        f"(b) Cost model: predicted daemon throughput (string keys, {MODEL_FEED}, {MODEL_FORM} columns, "
        f"worker batches of {batch:,}; workers = cores)",
        ["cores", "endpoints", "publish", "predicted ticks/s", "limited by", "ingest", "workers", "forwarder",
         "all cores", "CPU share ingest / workers / forwarder"],
    )  # fmt: skip
    data = {}
    for mode in PUBLISH_MODES:
        costs = stage_costs(figures, mode, batch, ingest)
        for cores in CORES:
            for endpoints in ENDPOINTS:
                p = predict(costs, cores, endpoints)
                caps, share = p["capacities"], p["cpu_share"]
                table.add(
                    cores,
                    endpoints,
                    mode,
                    rate(p["ticks_per_s"]),
                    p["limited_by"],
                    rate(caps["ingest"]) if "ingest" in caps else "n/a",
                    rate(caps["workers"]),
                    rate(caps["forwarder"]),
                    rate(caps["all cores"]),
                    " / ".join(f"{share[n]:.0%}" for n in ("ingest", "workers", "forwarder")),
                )
                data[f"{cores}-{endpoints}-{mode}"] = p
    source = ingest[1] if ingest else "not modelled (no figure: pass --ingest-capacity)"
    table.notes += [
        f"Ingest capacity per core: {rate(ingest[0]) + ' ticks/s, ' if ingest else ''}{source}.",
        "Per-core figures from section (a) of the same run. No load generators or subscribers are counted: "
        "the prediction is for a box running only the daemon.",
        "'all cores' = cores / CPU seconds per tick summed over ingest, workers and forwarder: with one worker "
        "per core plus the ingest and the supervisor there are more busy processes than cores.",
    ]
    table.data = data
    return table


def check_table(sections: dict[str, Any], ingest: tuple[float, str] | None) -> Table:
    figures = sections["stages"]["figures"]
    table = Table(
        "(b) Cost model vs section (c) on this box: 2 cores, 1 endpoint, generators and subscriber included",
        ["publish", "worker batch", "predicted ticks/s", "limited by", "measured sustained", "predicted / measured",
         "worker CPU us/tick model / measured", "forwarder (supervisor) us/tick model / measured"],
    )  # fmt: skip
    data: dict[str, Any] = {}
    for mode in PUBLISH_MODES:
        case = end_to_end(sections, mode)
        if not case or not case.get("at_sustained"):
            table.add(mode, "", "n/a", "", "section (c) did not run this case or found no passing rate", "", "", "")
            continue
        at = case["at_sustained"]
        harness = (at["generator_cpu_s"] + at["subscriber_cpu_s"]) / max(at["ticks"], 1)
        measured, cpu = case["sustained"], at["cpu_s_per_tick"]
        for batch in CHECK_BATCHES:
            costs = stage_costs(figures, mode, batch, ingest)
            p = predict(costs, 2, 1, harness_cpu=harness)
            table.add(
                mode,
                f"{batch:,}",
                rate(p["ticks_per_s"]),
                p["limited_by"],
                rate(measured),
                f"{p['ticks_per_s'] / measured:.2f}" if measured else "n/a",
                f"{costs.worker * 1e6:.2f} / {cpu['worker'] * 1e6:.2f}",
                f"{costs.forwarder * 1e6:.2f} / {cpu['supervisor'] * 1e6:.2f}",
            )
            data[f"{mode}-{batch}"] = {"prediction": p, "measured": measured, "harness_cpu_s_per_tick": harness}
    table.notes += [
        f"Case: {END_TO_END_CASE} of section (c); the generators' and subscriber's CPU per tick (from their own "
        "process_time) is added to the all-cores term, since they share this box's 2 cores.",
        "A worker's cost per tick depends on its batch size, which depends on the load (1 ms of input, or a "
        "backlog merged into one engine call), so the check brackets it with batches of 1,000 and 10,000.",
        "Measured CPU per tick comes from streamd_process_cpu_seconds_total at the sustained step; the "
        "supervisor's figure includes its /metrics and housekeeping, not only the forwarder.",
    ]
    table.data = data
    return table


def build(sections: dict[str, Any], batch: int = MODEL_BATCH, given_ingest: float | None = None) -> dict[str, Any]:
    ingest = ingest_capacity(sections, given_ingest)
    tables = [prediction_table(sections, batch, ingest), check_table(sections, ingest)]
    return {"title": "6. (b) Cost model", "tables": tables}


def run(quick: bool, earlier: dict[str, Any]) -> dict[str, Any]:
    return build(earlier if "stages" in earlier else latest_sections() | earlier)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, help="results JSON with section 'stages' (default: newest)")
    parser.add_argument("--ingest-capacity", type=float, help="ingest ticks/s per core (until section (a) has it)")
    parser.add_argument("--batch", type=int, default=MODEL_BATCH, help="worker batch size: 100, 1000 or 10000")
    args = parser.parse_args(argv)
    sections = json.loads(args.results.read_text())["sections"] if args.results else latest_sections()
    print_tables(build(sections, args.batch, args.ingest_capacity)["tables"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
