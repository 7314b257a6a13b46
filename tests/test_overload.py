"""Overload: memory stays bounded; pull mode pushes back on the feed, sub mode sheds and counts."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import zmq

from streamd.protocol import encode_columnar_bin
from tests.helpers import accounting, free_port, running_daemon

KEYS = [f"S{i:05d}" for i in range(10_000)]


def payloads(count: int, ticks: int = 2000) -> list[bytes]:
    """In-order columnar batches (times keep increasing across payloads)."""
    rng = np.random.default_rng(1)
    base = 1_700_000_000_000_000_000
    return [
        encode_columnar_bin(rng.choice(KEYS, ticks).tolist(), base + i * ticks + np.arange(ticks), rng.random(ticks))
        for i in range(count)
    ]


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096


def test_pull_mode_pushes_back_on_the_sender_and_stays_bounded(tmp_path: Path) -> None:
    """Unpaced PUSH input: the sender meets EAGAIN, the ingest's memory stays bounded, nothing is shed."""
    batch = payloads(50)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 10)
    sock.setsockopt(zmq.LINGER, 0)
    ingest_toml = "rcvhwm = 10\nmax_queue_bytes = 1048576"
    with running_daemon(tmp_path, workers=2, ingest_toml=ingest_toml) as daemon:
        sock.connect(daemon.ingest)
        ingest = next(p for p in daemon.children() if "ingest" in Path(f"/proc/{p}/comm").read_text())
        blocked, sent, peak = 0, 0, 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                sock.send(batch[sent % len(batch)], zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                blocked += 1
                time.sleep(0.001)
            if sent % 100 == 0:
                peak = max(peak, rss_bytes(ingest))
        sock.close()
        samples = daemon.wait_idle(timeout=60)
    ctx.term()
    assert blocked > 0, "the sender was never pushed back"
    assert samples["streamd_ingest_overload_total"] > 0
    assert samples.get('streamd_ticks_dropped_total{reason="overload"}', 0.0) == 0
    assert accounting(samples) == 0
    assert peak < 400 << 20, f"ingest RSS peaked at {peak >> 20} MiB"


def test_sub_mode_sheds_over_the_bound_and_counts_it(tmp_path: Path) -> None:
    """A SUB ingest cannot push back: over max_queue_bytes it drops with reason overload, all counted."""
    port = free_port()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 100_000)
    pub.bind(f"tcp://127.0.0.1:{port}")
    batch = payloads(300)
    ingest_toml = 'mode = "sub"\nrcvhwm = 100000\nmax_queue_bytes = 1048576'
    try:
        with running_daemon(tmp_path, workers=1, ingest=f"tcp://127.0.0.1:{port}", ingest_toml=ingest_toml) as daemon:
            time.sleep(0.5)  # the subscription reaches the publisher
            for payload in batch:
                pub.send(payload)
            daemon.wait_for(lambda: daemon.metric("streamd_ticks_received_total") == 300 * 2000, 60, "all input")
            samples = daemon.wait_idle(timeout=60)
    finally:
        pub.close()
        ctx.term()
    assert samples.get('streamd_ticks_dropped_total{reason="overload"}', 0.0) > 0
    assert accounting(samples) == 0
