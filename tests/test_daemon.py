"""The real daemon end to end: real processes, real ZeroMQ sockets, the real /metrics endpoint."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from streamd.protocol import encode_columnar_bin
from tests.helpers import Subscriber, accounting, feed, free_port, make_ticks, running_daemon
from tests.oracle import check_records_against_pandas

SIGNALS = """
[[signal]]
name = "tw"
window = "time"
size = "200ms"
stats = ["count", "sum", "mean", "std", "var", "min", "max", "first", "last", "volume", "vwap", "zscore"]
[[signal]]
name = "cw"
window = "count"
size = 7
stats = ["count", "sum", "mean", "std", "var", "min", "max", "first", "last", "volume", "vwap", "zscore"]
[[signal]]
name = "ew"
window = "ewma"
size = "150ms"
stats = ["ewma"]
"""


def payloads_in_every_shape(ticks: list[dict[str, Any]]) -> list[bytes]:
    """Cut the stream into consecutive chunks, each sent in a different payload shape."""
    payloads = []
    shapes = ["map", "array", "batch_maps", "batch_arrays", "columnar", "columnar_bin"]
    chunks = np.array_split(np.arange(len(ticks)), 60)
    for i, idx in enumerate(chunks):
        part = [ticks[j] for j in idx]
        shape = shapes[i % len(shapes)]
        if shape == "map":
            payloads += [msgpack.packb(tick) for tick in part]
        elif shape == "array":
            payloads += [msgpack.packb([x["k"], x["t"], x["p"], x["q"]]) for x in part]
        elif shape == "batch_maps":
            payloads.append(msgpack.packb(part))
        elif shape == "batch_arrays":
            payloads.append(msgpack.packb([[x["k"], x["t"], x["p"], x["q"]] for x in part]))
        elif shape == "columnar":
            payloads.append(msgpack.packb({c: [x[c] for x in part] for c in "ktpq"}))
        else:
            payloads.append(
                encode_columnar_bin(
                    [x["k"] for x in part],
                    np.array([x["t"] for x in part], np.int64),
                    np.array([x["p"] for x in part]),
                    np.array([x["q"] for x in part]),
                )
            )
    return payloads


def test_every_payload_shape_matches_pandas(tmp_path: Path) -> None:
    """Ticks sent in all payload shapes come out as records that match pandas for every stat."""
    ticks = make_ticks(3000, keys=25, seed=1)
    with running_daemon(tmp_path, workers=2, extra_toml=SIGNALS) as daemon:
        sub = Subscriber(daemon)
        sub.sync()
        feed(daemon.ingest, payloads_in_every_shape(ticks))
        newest = {x["k"]: x["t"] for x in ticks}
        sub.collect(lambda: sum(1 for r in sub.records if newest.get(r["k"]) == r["t"]) == 3 * len(newest))
        sub.close()
        samples = daemon.wait_idle()
    assert check_records_against_pandas(sub.records, ticks, daemon.config_path) >= 3 * len(newest)
    assert all(topic == f"{r['signal']}.{r['k']}".encode() for topic, r in zip(sub.topics, sub.records, strict=True))
    assert samples["streamd_ticks_received_total"] >= len(ticks)
    assert accounting(samples) == 0


def test_sub_mode_reads_a_feed_publisher_and_ignores_envelope_frames(tmp_path: Path) -> None:
    """ingest.mode = "sub" connects to a publisher; topic frames are ignored, prefixes filter."""
    port = free_port()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")
    ticks = make_ticks(600, keys=6, seed=2)
    try:
        with running_daemon(
            tmp_path,
            workers=2,
            extra_toml=SIGNALS,
            ingest=f"tcp://127.0.0.1:{port}",
            ingest_toml='mode = "sub"\nsubscribe = ["ticks."]',
        ) as daemon:
            sub = Subscriber(daemon)
            sub.sync(send=lambda payload: pub.send_multipart([b"ticks.probe", payload]))
            pub.send_multipart([b"other.topic", msgpack.packb({"k": "ignored", "t": 1, "p": 1.0})])
            for tick in ticks:
                pub.send_multipart([b"ticks." + tick["k"].encode(), b"envelope", msgpack.packb(tick)])
            newest = {x["k"]: x["t"] for x in ticks}
            sub.collect(lambda: sum(1 for r in sub.records if newest.get(r["k"]) == r["t"]) == 3 * len(newest))
            sub.close()
            daemon.wait_idle()
    finally:
        pub.close(0)
        ctx.term()
    assert not any(r["k"] == "ignored" for r in sub.records)
    assert check_records_against_pandas(sub.records, ticks, daemon.config_path) >= 3 * len(newest)


def test_batch_mode_and_emit_interval(tmp_path: Path) -> None:
    """publish = "batch" sends one columnar message per batch; emit_interval thins records, newest wins."""
    extra = """
[[signal]]
name = "b"
window = "count"
size = 5
stats = ["count", "mean"]
publish = "batch"
[[signal]]
name = "slow"
window = "count"
size = 5
stats = ["count", "last"]
emit_interval = "300ms"
"""
    ticks = make_ticks(2000, keys=10, seed=6)
    with running_daemon(tmp_path, workers=2, extra_toml=extra) as daemon:
        sub = Subscriber(daemon)
        sub.sync()
        started = time.monotonic()
        for i in range(0, len(ticks), 100):
            feed(daemon.ingest, [msgpack.packb(ticks[i : i + 100])])
            time.sleep(0.01)
        last = {x["k"]: x for x in ticks}
        sub.collect(lambda: sum(1 for r in sub.records if r["signal"] == "slow" and last[r["k"]]["t"] == r["t"]) == 10)
        elapsed = time.monotonic() - started
        sub.close()
    batches = [r for r in sub.records if r["signal"] == "b"]
    assert batches and all(isinstance(r["k"], list) and len(r["k"]) == len(r["t"]) == len(r["mean"]) for r in batches)
    rows = [
        {"signal": "b", "k": k, "t": t, "count": c, "mean": m}
        for r in batches
        for k, t, c, m in zip(r["k"], r["t"], r["count"], r["mean"], strict=True)
    ]
    assert check_records_against_pandas(rows, ticks, daemon.config_path) == len(rows) >= 10
    slow = [r for r in sub.records if r["signal"] == "slow"]
    per_key: dict[str, list[int]] = defaultdict(list)
    for record in slow:
        per_key[record["k"]].append(record["pub_ns"])
    for stamps in per_key.values():
        assert all(b - a >= 300_000_000 for a, b in itertools.pairwise(stamps))
        assert len(stamps) <= elapsed / 0.3 + 2
    assert check_records_against_pandas(slow, ticks, daemon.config_path) == len(slow)


def test_javascript_style_ints_and_big_times_are_exact(tmp_path: Path) -> None:
    """Integer prices and quantities are accepted; int keys and int64 times come back exactly."""
    base = 2**62 + 12345  # not representable in float64
    ticks = [{"k": 2**53 + 1, "t": base + i, "p": 100 + i % 3, "q": i % 2} for i in range(20)]
    with running_daemon(tmp_path, workers=2, extra_toml=SIGNALS) as daemon:
        sub = Subscriber(daemon)
        sub.sync()
        feed(daemon.ingest, [msgpack.packb(ticks)])
        sub.collect(lambda: len({r["signal"] for r in sub.records if r["t"] == base + 19}) == 3)
        sub.close()
    records = [r for r in sub.records if r["t"] == base + 19]
    assert {r["k"] for r in records} == {2**53 + 1}
    assert {r["signal"] for r in records} == {"tw", "cw", "ew"}
    cw = next(r for r in records if r["signal"] == "cw")
    np.testing.assert_allclose(cw["mean"], np.mean([100 + i % 3 for i in range(13, 20)]), rtol=1e-12)


def start_answering_ctrl_c(command: list[str]) -> subprocess.Popen[str]:
    """Start ``command`` with SIGINT at its default, so Python turns a Ctrl-C into KeyboardInterrupt.

    A suite started as a background job of a shell without job control (``cmd &`` in a script)
    inherits SIGINT ignored, and an ignored signal stays ignored through exec; a handled one is
    reset to the default there.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_replay_and_tail_commands(tmp_path: Path) -> None:
    """streamd replay publishes a CSV; streamd tail prints the matching signals as JSON lines."""
    csv_path = tmp_path / "ticks.csv"
    ticks = make_ticks(300, keys=3, seed=8)
    csv_path.write_text("k,t,p,q\n" + "".join(f"{x['k']},{x['t']},{x['p']!r},{x['q']}\n" for x in ticks))
    with running_daemon(tmp_path, workers=1, extra_toml=SIGNALS) as daemon:
        tail = start_answering_ctrl_c(
            [sys.executable, "-m", "streamd", "tail", "--endpoint", daemon.publish, "--signal", "cw", "--key", "K1"]
        )
        try:
            time.sleep(1.0)
            replay = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "streamd",
                    "replay",
                    str(csv_path),
                    "--endpoint",
                    daemon.ingest,
                    "--batch",
                    "50",
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert replay.returncode == 0, replay.stderr
            assert "300/300" in replay.stderr
            daemon.wait_idle()
        finally:
            tail.send_signal(signal.SIGINT)
            out, _ = tail.communicate(timeout=10)
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines and {(r["signal"], r["k"]) for r in lines} == {("cw", "K1")}
    assert check_records_against_pandas(lines, ticks, daemon.config_path) == len(lines)
