"""State that outlives processes ([state]): worker kill -9, SIGTERM and restart, whole-daemon kill, re-sharding."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from streamd.checkpoint import decode
from streamd.persistence import checkpoint_path
from streamd.protocol import encode_columnar_bin
from tests.helpers import Daemon, Subscriber, feed, make_ticks, running_daemon
from tests.oracle import check_records_against_pandas

SIGNALS = """
[[signal]]
name = "t1h"
window = "time"
size = "1h"
stats = ["count", "mean", "std", "min", "max", "vwap", "first", "last"]
[[signal]]
name = "c50"
window = "count"
size = 50
stats = ["count", "mean", "std", "min", "max"]
[[signal]]
name = "e1s"
window = "ewma"
size = "1s"
stats = ["ewma"]
"""


def state_toml(directory: Path, interval: str = "200ms") -> str:
    return f'[state]\ndir = "{directory}"\nsnapshot_interval = "{interval}"\n{SIGNALS}'


def checkpointed_ticks(directory: Path, workers: int) -> int:
    """Ticks the checkpoint files on disk hold, over every worker (none yet: 0)."""
    paths = [checkpoint_path(str(directory), worker, workers) for worker in range(workers)]
    return sum(sum(decode(path.read_bytes()).applied) for path in paths if path.exists())


def send_ticks(endpoint: str, ticks: list[dict[str, Any]], per_message: int = 100, pause: float = 0.0) -> None:
    """The ticks as columnar messages on one PUSH socket (one connection keeps them in order), optionally paced."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 10_000)
    sock.connect(endpoint)
    try:
        for start in range(0, len(ticks), per_message):
            chunk = ticks[start : start + per_message]
            payload = encode_columnar_bin(
                [x["k"] for x in chunk],
                np.array([x["t"] for x in chunk], np.int64),
                np.array([x["p"] for x in chunk]),
                np.array([x["q"] for x in chunk]),
            )
            sock.send(payload)
            if pause:
                time.sleep(pause)
    finally:
        sock.close()
        ctx.term()


def place(tmp_path: Path, name: str) -> Path:
    """A directory of its own for one daemon run (its config and log)."""
    path = tmp_path / name
    path.mkdir()
    return path


def real(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["k"] != "__probe__"]


def dropped(daemon: Daemon, reason: str) -> float:
    return daemon.metric(f'streamd_ticks_dropped_total{{reason="{reason}"}}')


def assert_every_last_tick_published(records: list[dict[str, Any]], ticks: list[dict[str, Any]]) -> None:
    """No tick lost: each key's newest tick has a record in every signal."""
    last = {tick["k"]: tick["t"] for tick in ticks}
    seen = {(r["signal"], r["k"], r["t"]) for r in records}
    for signal_name in ("t1h", "c50", "e1s"):
        missing = [k for k, t in last.items() if (signal_name, k, t) not in seen]
        assert not missing, (signal_name, missing[:5])


def test_worker_kill_mid_stream_replays_from_its_checkpoint(tmp_path: Path) -> None:
    """kill -9 of a worker while ticks flow: no worker_lost, every record equals the pandas reference."""
    ticks = make_ticks(24_000, keys=40, seed=3)
    with running_daemon(tmp_path, workers=2, extra_toml=state_toml(tmp_path / "state")) as daemon:
        sub = Subscriber(daemon)
        sub.sync()
        feeder = threading.Thread(target=send_ticks, args=(daemon.ingest, ticks, 100, 0.01))
        feeder.start()
        try:
            daemon.wait_for(
                lambda: daemon.metric('streamd_checkpoints_total{result="written"}') >= 2, what="checkpoints"
            )
            daemon.wait_for(lambda: daemon.metric("streamd_ticks_processed_total") > 8_000, what="ticks flowing")
            victim = daemon.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            daemon.wait_for(lambda: "replaying the ticks its checkpoint lacks" in daemon.log(), what="the replay")
        finally:
            feeder.join(60)
        samples = daemon.wait_idle(30)
        sub.collect(lambda: len({(r["signal"], r["k"], r["t"]) for r in real(sub.records)}) >= 3 * 40, timeout=10)
        sub.drain(1.0)
        sub.close()
        assert not {k: v for k, v in samples.items() if k.startswith("streamd_ticks_dropped_total") and v}
        assert daemon.metric("streamd_journal_replayed_ticks_total") > 0
        log = daemon.log()
    assert "Traceback" not in log
    records = real(sub.records)
    assert_every_last_tick_published(records, ticks)
    assert check_records_against_pandas(records, ticks, daemon.config_path) == len(records)


def test_sigterm_writes_a_final_checkpoint_and_a_restart_resumes_every_window(tmp_path: Path) -> None:
    """SIGTERM, then a new daemon on the same state.dir: time, count and ewma windows include the old ticks."""
    base = 1_700_000_000_000_000_000
    ticks = [{"k": "A", "t": base + i * 10_000_000, "p": 100.0 + (i % 7), "q": 1.0 + i % 3} for i in range(30)]
    state = tmp_path / "state"
    with running_daemon(place(tmp_path, "one"), workers=2, extra_toml=state_toml(state, "1h")) as daemon:
        sub = Subscriber(daemon)
        sub.sync()
        feed(daemon.ingest, [msgpack.packb(tick) for tick in ticks[:20]])
        sub.collect(lambda: any(r["k"] == "A" and r.get("count") == 20 for r in sub.records))
        sub.close()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(10) == 0
    with running_daemon(place(tmp_path, "two"), workers=2, extra_toml=state_toml(state, "1h")) as daemon:
        assert "windows restored from checkpoint" in daemon.log()
        assert "without a final checkpoint" not in daemon.log()
        sub = Subscriber(daemon)
        sub.sync()
        feed(daemon.ingest, [msgpack.packb(tick) for tick in ticks[20:]])
        sub.collect(lambda: any(r["k"] == "A" and r.get("count") == 30 for r in sub.records))
        sub.drain(0.3)
        sub.close()
    after = [r for r in sub.records if r["k"] == "A"]
    assert {r["signal"] for r in after} == {"t1h", "c50", "e1s"}
    assert max(r["count"] for r in after if r["signal"] == "c50") == 30
    assert check_records_against_pandas(after, ticks, daemon.config_path) == len(after)


def test_restored_keys_that_never_come_back_are_evicted_after_key_ttl(tmp_path: Path) -> None:
    """After a restart, checkpointed keys no ingest receives again are evicted once key_ttl has passed."""
    base = 1_700_000_000_000_000_000
    keys = [f"K{i}" for i in range(10)]
    ticks = [{"k": k, "t": base + i * 1_000_000, "p": 10.0 + i, "q": 1.0} for i, k in enumerate(keys)]
    state = tmp_path / "state"
    with running_daemon(place(tmp_path, "one"), workers=2, extra_toml=state_toml(state, "1h")) as daemon:
        feed(daemon.ingest, [msgpack.packb(tick) for tick in ticks])
        daemon.wait_idle(20)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(10) == 0
    toml = state_toml(state, "1h").replace("[state]\n", '[state]\nkey_ttl = "2s"\n')
    with running_daemon(place(tmp_path, "two"), workers=2, extra_toml=toml) as daemon:
        assert "windows restored from checkpoint" in daemon.log()
        assert daemon.metric("streamd_worker_keys") == len(keys)
        sub = Subscriber(daemon)
        sub.sync()
        again = [{"k": "K0", "t": base + (100 + i) * 1_000_000, "p": 1.0, "q": 1.0} for i in range(60)]
        sender = threading.Thread(target=send_ticks, args=(daemon.ingest, again, 1, 0.1))
        sender.start()  # K0 keeps ticking for 6 s, through the TTL, so only the nine silent keys go
        daemon.wait_for(  # the nine silent keys, and the subscriber's sync probe key
            lambda: daemon.metric("streamd_keys_evicted_total") >= len(keys), what="evictions"
        )
        daemon.wait_for(lambda: daemon.metric("streamd_worker_keys") == 1, what="K0 the only key held")
        evicted = daemon.metric("streamd_keys_evicted_total")
        sender.join(20)
        sub.collect(lambda: any(r["k"] == "K0" and r["signal"] == "c50" and r["count"] == 50 for r in sub.records))
        counts = [r["count"] for r in sub.records if r["k"] == "K0" and r["signal"] == "t1h"]
        sub.close()
    assert evicted == len(keys)
    assert max(counts) == 61  # K0 was never evicted: its restored window still holds its tick from before the restart


def test_whole_daemon_kill_resumes_from_the_last_checkpoint_and_logs_the_lost_range(tmp_path: Path) -> None:
    """kill -9 of the supervisor: the next start resumes from the periodic checkpoint and says what was lost."""
    ticks = make_ticks(3_000, keys=10, seed=5)
    state = tmp_path / "state"
    with running_daemon(place(tmp_path, "one"), workers=2, extra_toml=state_toml(state)) as daemon:
        send_ticks(daemon.ingest, ticks)
        received = daemon.wait_idle()["streamd_ticks_received_total"]
        daemon.wait_for(lambda: checkpointed_ticks(state, 2) == received, what="checkpoints holding every tick")
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(5)
    more = make_ticks(500, keys=10, seed=6, start_ns=ticks[-1]["t"] + 1)
    with running_daemon(place(tmp_path, "two"), workers=2, extra_toml=state_toml(state)) as daemon:
        log = daemon.log()
        assert "windows restored from checkpoint" in log
        assert "the previous run stopped without a final checkpoint" in log and "lost_from=" in log
        sub = Subscriber(daemon)
        sub.sync()
        send_ticks(daemon.ingest, more)
        daemon.wait_idle()
        sub.drain(0.5)
        sub.close()
    records = real(sub.records)
    assert_every_last_tick_published(records, more)
    assert check_records_against_pandas(records, ticks + more, daemon.config_path) == len(records)


def test_a_worker_killed_soon_after_an_ingest_death_keeps_what_that_ingest_had_handed_it(tmp_path: Path) -> None:
    """The dead ingest's replay journal died with it, so every worker checkpoints at once: a worker
    killed right after resumes with every tick, long before its snapshot_interval (1 h here) is due."""
    ticks = make_ticks(2_000, keys=10, seed=8)
    more = make_ticks(300, keys=10, seed=9, start_ns=ticks[-1]["t"] + 1)
    with running_daemon(tmp_path, workers=1, extra_toml=state_toml(tmp_path / "state", interval="1h")) as daemon:
        sub = Subscriber(daemon)
        sub.sync()
        send_ticks(daemon.ingest, ticks)
        daemon.wait_idle()
        ingest = next(pid for pid in daemon.children() if "streamd-ingest" in Path(f"/proc/{pid}/comm").read_text())
        os.kill(ingest, signal.SIGKILL)
        daemon.wait_for(
            lambda: daemon.metric('streamd_checkpoints_total{result="written"}') >= 1,
            what="a checkpoint right after the ingest's death",
        )
        daemon.wait_for(lambda: "ingest started" in daemon.log().split("ingest died, restarting")[-1], what="ingest")
        os.kill(daemon.worker_pids()[0], signal.SIGKILL)
        daemon.wait_for(lambda: daemon.metric("streamd_worker_restarts_total") == 1, what="the worker's restart")
        daemon.wait_for(lambda: daemon.metric("streamd_worker_up") == 1, what="the worker up again")
        send_ticks(daemon.ingest, more)
        samples = daemon.wait_idle()
        sub.drain(0.5)
        sub.close()
        log = daemon.log()
    assert "ticks missing from the replay" not in log and "Traceback" not in log
    assert not {k: v for k, v in samples.items() if k.startswith("streamd_ticks_dropped_total") and v}
    records = [r for r in real(sub.records) if r["t"] >= more[0]["t"]]
    assert_every_last_tick_published(records, more)
    assert check_records_against_pandas(records, ticks + more, daemon.config_path) == len(records)


def test_a_new_worker_count_reshards_the_checkpointed_keys(tmp_path: Path) -> None:
    """Stopped with 2 workers, started with 3: every key's windows continue on its new worker."""
    ticks = make_ticks(2_000, keys=30, seed=7)
    state = tmp_path / "state"
    with running_daemon(place(tmp_path, "one"), workers=2, extra_toml=state_toml(state)) as daemon:
        send_ticks(daemon.ingest, ticks)
        daemon.wait_idle()
    more = make_ticks(600, keys=30, seed=8, start_ns=ticks[-1]["t"] + 1)
    with running_daemon(place(tmp_path, "two"), workers=3, extra_toml=state_toml(state)) as daemon:
        assert "re-sharding their keys" in daemon.log()
        sub = Subscriber(daemon)
        sub.sync()
        send_ticks(daemon.ingest, more)
        daemon.wait_idle()
        sub.drain(0.5)
        sub.close()
    records = real(sub.records)
    assert_every_last_tick_published(records, more)
    assert check_records_against_pandas(records, ticks + more, daemon.config_path) == len(records)


def test_corrupt_or_mismatched_checkpoints_are_logged_and_start_empty(tmp_path: Path) -> None:
    """A corrupted file and a changed window are each one log line; the daemon runs with those windows empty."""
    base = 1_700_000_000_000_000_000
    state = tmp_path / "state"
    with running_daemon(place(tmp_path, "one"), workers=1, extra_toml=state_toml(state)) as daemon:
        feed(daemon.ingest, [msgpack.packb({"k": "A", "t": base + i, "p": 1.0 + i}) for i in range(10)])
        daemon.wait_idle()
    changed = state_toml(state).replace("size = 50", "size = 60")
    with running_daemon(place(tmp_path, "two"), workers=1, extra_toml=changed) as daemon:
        sub = Subscriber(daemon)
        sub.sync()
        feed(daemon.ingest, [msgpack.packb({"k": "A", "t": base + 10, "p": 11.0})])
        sub.collect(lambda: {r["signal"] for r in sub.records if r["k"] == "A"} == {"t1h", "c50", "e1s"})
        sub.close()
        log = daemon.log()
    assert "signal starts empty" in log and "signal=c50" in log
    counts = {r["signal"]: r["count"] for r in sub.records if r["k"] == "A" and "count" in r}
    assert counts == {"t1h": 11, "c50": 1}
    checkpoint = state / "worker-0-of-1.ckpt"
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    with running_daemon(place(tmp_path, "three"), workers=1, extra_toml=state_toml(state)) as daemon:
        sub = Subscriber(daemon)
        sub.sync()
        feed(daemon.ingest, [msgpack.packb({"k": "A", "t": base + 11, "p": 12.0})])
        sub.collect(lambda: any(r["k"] == "A" and r["signal"] == "t1h" for r in sub.records))
        sub.close()
        log = daemon.log()
    assert "checkpoint not loaded" in log and "checksum mismatch" in log and "Traceback" not in log
    assert [r["count"] for r in sub.records if r["k"] == "A" and r["signal"] == "t1h"] == [1]
