"""Overload: 60 s at 3x the sustainable rate, then back to normal.

``python -m bench.overload [--sustainable TICKS_PER_S] [--seconds 60]``

The daemon (2 workers, built-in signals, batch publish, default ``ingest.max_queue_bytes`` and
``rcvhwm``; its own session, as under systemd) is fed columnar list batches of string keys.
First its capacity for that feed is measured (10 s unpaced, until idle again); sustainable is
0.8x that (or ``--sustainable``).

The burst is a feed whose ticks happen at 3x sustainable: its event times advance at that rate
(:class:`bench.harness.EventClock`), however far back-pressure delays their sending. Its 1 s
window then holds 3x the ticks of a normal second: that is data the windows must hold, not a
queue. So the baseline is the peak resident memory over 20 s at the sustainable rate with the
burst's density of event times (ticks stamped 3x as close together); the memory of 20 s at
the sustainable rate with real-time stamps is printed beside it. Then 60 s at 3x sustainable.

A probe sends one tick of its own key every 50 ms throughout and times its record. Printed: the
offered and accepted rates (PUSH senders are pushed back: accepted < offered), the peak resident
memory (all processes) against baseline + the input bounds (``max_queue_bytes`` + ``rcvhwm``
messages), the books after the burst, how long after the burst the probe's median latency over
each second was back within 2x its idle median (+1 ms), and when the last single slow probe came.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any

import msgpack
import zmq

from bench.harness import Daemon, EventClock, Feed, SignalOptions, offer_load, running_daemon
from bench.report import RESULTS_DIR
from bench.soak import daemon_rss

PROBE_KEY = "__overload_probe__"
RCVHWM_MESSAGES = 1_000  # ingest.rcvhwm default
MAX_QUEUE_BYTES = 256 << 20  # ingest.max_queue_bytes default
MESSAGE_BYTES = 30_000  # a 1,000-tick list-column batch of string keys, about
STEADY_S = 20.0  # each steady phase at the sustainable rate before the burst
BURST = 3.0  # the burst's rate, in multiples of the sustainable rate


class Probe:
    """One tick of its own key every 50 ms on its own socket; the latency of each tick's record."""

    def __init__(self, ingest: str, publish: str) -> None:
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.connect(ingest)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"px1s")
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.connect(publish)
        self.samples: list[tuple[float, float]] = []  # (send time, latency ms)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        sent: dict[int, float] = {}
        next_send = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_send:
                t = time.time_ns()
                sent[t] = now
                self.push.send(msgpack.packb({"k": PROBE_KEY, "t": t, "p": 1.0}), zmq.NOBLOCK)
                next_send += 0.05
            if self.sub.poll(5):
                record = msgpack.unpackb(self.sub.recv_multipart()[-1], strict_map_key=False)
                for key, t in zip(record["k"], record["t"], strict=True):
                    if key == PROBE_KEY and t in sent:
                        self.samples.append((sent[t], (time.monotonic() - sent.pop(t)) * 1e3))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.push.close(0)
        self.sub.close(0)
        self.ctx.term()


def median_latency(samples: list[tuple[float, float]], start: float, end: float) -> float:
    window = [ms for at, ms in samples if start <= at < end]
    return statistics.median(window) if window else float("nan")


def recovery_seconds(samples: list[tuple[float, float]], burst_end: float, normal_ms: float) -> float | None:
    """Seconds after the burst until the probe's median over each following second stays within 2x
    the normal median (+1 ms). A median, so that one slow probe on a shared box does not count as
    latency not back to normal; :func:`last_slow_probe` reports the single probes."""
    late = [(at, ms) for at, ms in samples if at >= burst_end]
    medians = [
        (at, statistics.median(ms for then, ms in late[index:] if then < at + 1.0))
        for index, (at, _) in enumerate(late)
    ]
    for index, (at, _) in enumerate(medians):
        if all(median <= 2 * normal_ms + 1.0 for _, median in medians[index:]):
            return at - burst_end
    return None


def last_slow_probe(samples: list[tuple[float, float]], burst_end: float, normal_ms: float) -> float | None:
    """Seconds after the burst of the last single probe over 2x the normal median (+1 ms), if any."""
    slow = [at for at, ms in samples if at >= burst_end and ms > 2 * normal_ms + 1.0]
    return slow[-1] - burst_end if slow else None


def sample_rss(daemon: Daemon, rss: list[tuple[float, int]], seconds: float) -> None:
    """Resident memory of every daemon process, every 0.5 s for ``seconds``."""
    assert daemon.process is not None
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        rss.append((time.monotonic(), daemon_rss(daemon.process.pid)))
        time.sleep(0.5)


def measure_capacity(daemon: Daemon, feed: Feed, seconds: float) -> float:
    """Ticks/s the daemon processes from this feed, unpaced: ticks sent over the time until it is idle again."""
    started = time.monotonic()
    load = offer_load(daemon.ingests, feed, 0, seconds, generators_per_endpoint=2)
    daemon.wait_idle(120)
    return float(load["ticks"]) / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sustainable", type=float, default=None, help="ticks/s the daemon sustains (default: measured first)"
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    feed = Feed("list", 10_000)
    with running_daemon(2, SignalOptions("batch")) as daemon:
        assert daemon.process is not None
        probe = Probe(daemon.ingests[0], daemon.publish)
        probe.thread.start()
        rss: list[tuple[float, int]] = []
        started = time.monotonic()
        sample_rss(daemon, rss, 5)
        capacity = measure_capacity(daemon, feed, 10) if args.sustainable is None else args.sustainable / 0.8
        sustainable = 0.8 * capacity
        burst_density = BURST * sustainable / feed.ticks_per_message  # messages per event-second

        def phase(rate: float, seconds: float, clock: EventClock | None) -> tuple[dict[str, Any], int]:
            """Offer ``rate`` for ``seconds``; return the load report and the peak RSS meanwhile."""
            first = len(rss)
            load = offer_load(
                daemon.ingests,
                feed,
                rate,
                seconds,
                generators_per_endpoint=2,
                during=lambda: rss.append((time.monotonic(), daemon_rss(daemon.process.pid))),  # type: ignore[union-attr]
                clock=clock,
            )
            return load, max(r for _, r in rss[first:])

        _, normal_rss = phase(sustainable, STEADY_S, None)
        steady, baseline_rss = phase(sustainable, STEADY_S, EventClock(time.time_ns(), burst_density))
        burst_start = time.monotonic()
        load, _ = phase(BURST * sustainable, args.seconds, EventClock(time.time_ns(), burst_density))
        burst_end = time.monotonic()
        sample_rss(daemon, rss, 15)
        idle, books = daemon.wait_idle(120)
        probe.close()
    normal = median_latency(probe.samples, started, started + 5)
    result: dict[str, Any] = {
        "capacity_ticks_per_s": round(capacity),
        "sustainable_ticks_per_s": round(sustainable),
        "steady_accepted_ticks_per_s": steady.get("achieved"),
        "offered_ticks_per_s": load.get("offered"),
        "accepted_ticks_per_s": load.get("achieved"),
        "burst_s": args.seconds,
        "rss_sustainable_realtime_mib": round(normal_rss / 2**20, 1),
        "rss_baseline_mib": round(baseline_rss / 2**20, 1),
        "rss_peak_mib": round(max(r for _, r in rss) / 2**20, 1),
        "rss_bound_mib": round((baseline_rss + MAX_QUEUE_BYTES + RCVHWM_MESSAGES * MESSAGE_BYTES) / 2**20, 1),
        "books_balance": idle,
        "books": books,
        "probe_ms_before": round(normal, 2),
        "probe_ms_during": round(median_latency(probe.samples, burst_start, burst_end), 2),
        "back_to_normal_after_s": recovery_seconds(probe.samples, burst_end, normal),
        "last_slow_probe_after_s": last_slow_probe(probe.samples, burst_end, normal),
    }
    print(f"{'metric':<28} value")
    for name, value in result.items():
        print(f"{name:<28} {value}")
    result["rss_mib"] = [(round(at - started, 1), round(r / 2**20, 1)) for at, r in rss]
    result["probe_ms_after_burst"] = [
        (round(at - burst_end, 2), round(ms, 2)) for at, ms in probe.samples if at >= burst_end
    ]
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "overload-latest.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"results: {RESULTS_DIR / 'overload-latest.json'}")


if __name__ == "__main__":
    main()
