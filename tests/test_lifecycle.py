"""Process lifecycle of the real daemon: restarts, clean stop, reload, and user errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack

from tests.helpers import Subscriber, accounting, daemon_config, feed, free_port, running_daemon, steady_feed


def final_books(log: str) -> dict[str, int]:
    """received/processed/dropped from the supervisor's last log line."""
    line = next(line for line in reversed(log.splitlines()) if 'msg="streamd stopped"' in line)
    fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
    return {name: int(fields[name]) for name in ("received", "processed", "dropped")}


def test_sigterm_under_continuous_input_delivers_in_flight_ticks_and_exits_zero(tmp_path: Path) -> None:
    """SIGTERM while a feed keeps sending: intake stops, what was received is applied, exit 0 in time."""
    stop = threading.Event()
    with running_daemon(tmp_path, workers=2) as daemon:
        keys = [f"S{i:04d}" for i in range(300)]
        feeder = threading.Thread(target=steady_feed, args=(daemon.ingest, stop, 1, keys))
        feeder.start()
        try:
            daemon.wait_for(lambda: daemon.metric("streamd_ticks_processed_total") > 3000, what="ticks flowing")
            children = daemon.children()
            started = time.monotonic()
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.proc.wait(10) == 0
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            feeder.join(10)
    assert elapsed < 5  # shutdown.graceful_timeout
    deadline = time.monotonic() + 3
    while [pid for pid in children if Path(f"/proc/{pid}").exists()] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [(pid, Path(f"/proc/{pid}/cmdline").read_text()) for pid in children if Path(f"/proc/{pid}").exists()]
    log = daemon.log()
    books = final_books(log)
    assert books["received"] > 3000
    assert books["received"] == books["processed"] + books["dropped"], books
    assert "did not stop in time" not in log and "Traceback" not in log


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie lingers until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_children_exit_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """kill -9 of the supervisor: every child notices within a second and exits, freeing its ports."""
    with running_daemon(tmp_path, workers=2, ingests=2) as daemon:
        children = daemon.children()
        assert len([pid for pid in children if "streamd-" in Path(f"/proc/{pid}/comm").read_text()]) == 4
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(5)
        deadline = time.monotonic() + 1.0
        while any(running(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.02)
        alive = [pid for pid in children if running(pid)]
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
    assert not alive


def test_sighup_reload_keeps_state_of_unchanged_signals(tmp_path: Path) -> None:
    """SIGHUP: an unchanged signal keeps its window, a new one starts, a bad config is rejected."""
    signals = '[[signal]]\nname = "c"\nwindow = "count"\nsize = 1000\nstats = ["count"]\n'
    with running_daemon(tmp_path, workers=1, extra_toml=signals) as daemon:
        sub = Subscriber(daemon)
        sub.sync()
        base = 1_700_000_000_000_000_000
        feed(daemon.ingest, [msgpack.packb({"k": "A", "t": base + i, "p": 1.0 + i}) for i in range(10)])
        sub.collect(lambda: any(r["k"] == "A" and r["count"] == 10 for r in sub.records))
        text = daemon.config_path.read_text()
        daemon.config_path.write_text(text + '[[signal]]\nname = "m"\nwindow = "count"\nsize = 3\nstats = ["mean"]\n')
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for(lambda: "config reloaded" in daemon.log(), what="the reload")
        feed(daemon.ingest, [msgpack.packb({"k": "A", "t": base + 10, "p": 11.0})])
        sub.collect(lambda: any(r["signal"] == "m" for r in sub.records))
        counts = [r["count"] for r in sub.records if r["signal"] == "c" and r["k"] == "A"]
        means = [r["mean"] for r in sub.records if r["signal"] == "m"]
        daemon.config_path.write_text(text + '[[signal]]\nname = "bad name"\nwindow = "count"\nsize = 3\n')
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for(lambda: "config reload rejected" in daemon.log(), what="the rejection")
        feed(daemon.ingest, [msgpack.packb({"k": "A", "t": base + 11, "p": 12.0})])
        sub.collect(lambda: any(r.get("count") == 12 for r in sub.records))
        sub.close()
        assert daemon.proc.poll() is None
        assert daemon.metric('streamd_config_reloads_total{result="failure"}') == 1
    assert counts[-1] == 11
    assert means == [11.0]


def _run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "streamd", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def test_bad_config_is_one_clear_line_naming_the_key(tmp_path: Path) -> None:
    """A wrong config value ends with one line naming the key and exit code 2, no traceback."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[[signal]]\nname = "x"\nwindow = "time"\nsize = "5 parsecs"\n')
    for args in (["run", "--config", str(bad)], ["check-config", str(bad)]):
        result = _run_cli(*args)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "streamd: error: signal[0].size: bad duration '5 parsecs' (use a number and one of ns, us, ms, s, m, h)"
        ]
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[ingest]\nendpoint = 'tcp://127.0.0.1:1'\n")
    result = _run_cli("check-config", str(unknown))
    assert result.returncode == 2 and "ingest.endpoint: unknown key" in result.stderr


def test_check_config_accepts_the_shipped_production_config() -> None:
    """deploy/streamd.toml is valid."""
    result = _run_cli("check-config", str(Path(__file__).parents[1] / "deploy" / "streamd.toml"))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    """Every bind the daemon does fails cleanly when the port is taken."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        for section in ("ingest", "publish", "metrics"):
            ports = {name: free_port() for name in ("ingest", "publish", "metrics")}
            ports[section] = taken
            config = tmp_path / f"{section}.toml"
            config.write_text(
                daemon_config(
                    f"tcp://127.0.0.1:{ports['ingest']}",
                    f"tcp://127.0.0.1:{ports['publish']}",
                    f"127.0.0.1:{ports['metrics']}",
                    1,
                    "",
                )
            )
            result = _run_cli("run", "--config", str(config))
            assert result.returncode == 2, result.stderr
            lines = [line for line in result.stderr.splitlines() if "streamd: error" in line]
            assert len(lines) == 1 and str(taken) in lines[0], result.stderr
            assert "Traceback" not in result.stderr


def test_bad_endpoint_is_rejected_at_load(tmp_path: Path) -> None:
    """An endpoint that is not a ZeroMQ address is a config error naming the key."""
    config = tmp_path / "c.toml"
    config.write_text('[publish]\nendpoint = "localhost:5556"\n')
    result = _run_cli("run", "--config", str(config))
    assert result.returncode == 2
    assert "publish.endpoint: bad endpoint" in result.stderr


def test_demo_prints_live_signals_and_stops_cleanly() -> None:
    """The Quick start demo runs on the built-in config, prints signals, and exits 0."""
    result = _run_cli("demo", "--duration", "4", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "px1s: count=" in result.stdout and "ewma1s: ewma=" in result.stdout
    assert "metrics at http://127.0.0.1:9108/metrics" in result.stdout
    assert "Traceback" not in result.stderr


def test_sighup_applies_log_settings_in_every_process(tmp_path: Path) -> None:
    """A reload switching log.format to json reaches the ingest and every worker, not only the supervisor."""
    with running_daemon(tmp_path, workers=2, ingests=2) as daemon:
        daemon.config_path.write_text(daemon.config_path.read_text() + '\n[log]\nformat = "json"\n')
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for(lambda: daemon.log().count('"signals reconfigured"') == 2, what="json lines from both workers")
        daemon.wait_for(
            lambda: daemon.log().count('"batching and logging reloaded"') == 2, what="json from both ingests"
        )
        log = daemon.log()
    procs = {json.loads(line)["proc"] for line in log.splitlines() if line.startswith("{")}
    assert {"worker0", "worker1", "ingest0", "ingest1"} <= procs


def test_a_stalled_worker_is_detected_killed_and_replaced(tmp_path: Path) -> None:
    """A worker that stops applying while it holds a backlog (SIGSTOP) is reported, killed and replaced."""
    with running_daemon(tmp_path, workers=1) as daemon:
        victim = daemon.worker_pids()[0]
        os.kill(victim, signal.SIGSTOP)
        try:
            feed(
                daemon.ingest,
                [msgpack.packb({"k": "A", "t": 1_700_000_000_000_000_000 + i, "p": 1.0}) for i in range(5)],
            )
            daemon.wait_for(lambda: "worker stalled" in daemon.log(), timeout=20, what="the stall report")
            daemon.wait_for(
                lambda: daemon.metric("streamd_worker_up") == 1 and victim not in daemon.worker_pids(),
                what="a replacement",
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        samples = daemon.wait_idle()
    assert samples.get('streamd_ticks_dropped_total{reason="worker_lost"}', 0) == 5
    assert accounting(samples) == 0
