"""Metric files of dead children are folded into one archive: totals kept, files not piling up."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from streamd.metrics import SupervisorView, archive_dead_process, serving_registry

WRITE = """
from streamd.metrics import WorkerMetrics
m = WorkerMetrics({worker})
m.ticks_processed.inc({ticks})
m.latency.observe(0.001)
m.keys.set(5)
import os; print(os.getpid())
"""


def child_writes(directory: Path, worker: int, ticks: int) -> int:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    code = WRITE.format(worker=worker, ticks=ticks)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=30)
    return int(out.stdout)


def totals(directory: Path, lock: threading.Lock) -> dict[str, float]:
    view = SupervisorView(
        processes=list,
        worker_up=dict,
        restarts=dict,
        ingest_restarts=dict,
        backlog=dict,
        reloads=dict,
        version="test",
        config_hash=str,
    )
    registry = serving_registry(str(directory), view, lock)
    processed = sum(
        registry.get_sample_value("streamd_ticks_processed_total", {"worker": w}) or 0.0 for w in ("0", "1")
    )
    latency = registry.get_sample_value("streamd_latency_seconds_count") or 0.0
    return {"processed": processed, "latency_count": latency}


def test_dead_children_fold_into_the_archive_and_totals_stay(tmp_path: Path) -> None:
    """Three generations of a worker die: the totals are unchanged and only archive files remain for them."""
    lock = threading.Lock()
    alive = child_writes(tmp_path, 1, 7)
    dead = [child_writes(tmp_path, 0, ticks) for ticks in (100, 20, 3)]
    before = totals(tmp_path, lock)
    for pid in dead:
        archive_dead_process(pid, str(tmp_path), lock)
    after = totals(tmp_path, lock)
    assert before == after == {"processed": 130.0, "latency_count": 4.0}
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in names if any(str(pid) in n for pid in dead)]
    assert "counter_archive.db" in names and "histogram_archive.db" in names
    assert f"counter_{alive}.db" in names
