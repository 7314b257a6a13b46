"""Section (a): what one core of each pipeline stage can do, each stage measured alone.

- **worker stage**: ``streamd.windows.Engine(DEFAULT_SIGNALS)`` fed the batches an ingest would hand
  one worker of ``W``: string keys owned by that worker under :func:`streamd.sharding.shard_for`, dense
  slots in first-seen order, the worker's ticks cut into batches of 100, 1,000 and 10,000;
- **publishing** (inside the worker process): :mod:`streamd.records` encoding plus the PUB sends of the
  rows those batches produce, record and batch mode, into a subscriber in another process;
- **forwarder** (inside the supervisor): ``zmq.proxy`` XSUB -> XPUB moving record messages;
- **ingest**: :func:`ingest_stage`, a hook to be filled in after the ingest rewrite.

The cost model (:mod:`bench.model`) combines these figures into a prediction for N cores.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from bench.harness import CONTEXT, Feed, offer_load
from bench.report import Table, rate
from bench.ticks import Ticks, generate, symbols
from streamd.config import DEFAULT_SIGNALS, Config, WorkersConfig
from streamd.control import Stop
from streamd.ingest import IngestStart, ingest_main
from streamd.ledger import TickLedger
from streamd.records import encode_batch_record, encode_record_payloads, record_head, topic_for
from streamd.runtime import RuntimePaths
from streamd.sharding import shard_for
from streamd.transport import WorkerBatch, decode, encode_ack
from streamd.windows import Engine, SignalResult
from tests.helpers import free_port

BATCH_SIZES = (100, 1_000, 10_000)
WORKERS = 2  # the worker count whose batches are recorded (this machine's default)
FEEDS = (("10,000 keys, Zipf", 10_000, False), ("100,000 keys, uniform", 100_000, True))
PUBLISH_MODES = ("record", "batch")
SNDMORE = int(zmq.SNDMORE)


@dataclass(frozen=True)
class WorkerBatches:
    """What one worker receives: slot, time, price and quantity columns per batch, and slot -> key."""

    batches: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    keys: np.ndarray  # object array, slot -> key string

    @property
    def ticks(self) -> int:
        return sum(len(b[0]) for b in self.batches)


def record_worker_batches(ticks: Ticks, workers: int, batch: int, worker: int = 0) -> WorkerBatches:
    """The batches of ``batch`` ticks that the ingest hands ``worker`` of ``workers`` for this stream."""
    names = symbols(ticks.n_keys)
    owner = np.array([shard_for(key, workers) for key in names.tolist()], np.int64)
    seen, first_at = np.unique(ticks.keys, return_index=True)
    in_arrival_order = seen[np.argsort(first_at)]
    mine = in_arrival_order[owner[in_arrival_order] == worker]
    slot_of_id = np.full(ticks.n_keys, -1, np.int64)
    slot_of_id[mine] = np.arange(len(mine))
    chosen = owner[ticks.keys] == worker
    slots, t, p, q = slot_of_id[ticks.keys[chosen]], ticks.t[chosen], ticks.p[chosen], ticks.q[chosen]
    cuts = range(0, len(slots) - batch + 1, batch)
    return WorkerBatches(
        [(slots[s : s + batch], t[s : s + batch], p[s : s + batch], q[s : s + batch]) for s in cuts], names[mine]
    )


def engine_seconds(recorded: WorkerBatches) -> float:
    engine = Engine(DEFAULT_SIGNALS)
    start = time.perf_counter()
    for slots, t, p, q in recorded.batches:
        engine.process(slots, t, p, q)
    return time.perf_counter() - start


def engine_results(recorded: WorkerBatches) -> list[list[SignalResult]]:
    engine = Engine(DEFAULT_SIGNALS)
    return [engine.process(*batch)[0] for batch in recorded.batches]


# -- publishing ------------------------------------------------------------------------------------


def sink_main(endpoint: str, bind: bool, ready: Any, stop: Any, results: Any) -> None:
    """SUB everything and count messages: bound, it stands in for the forwarder a worker publishes to;
    connected, for a user subscribed to the forwarder."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    if bind:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    ready.set()
    messages = 0
    while not stop.is_set():
        if sock.poll(100):
            try:
                while True:
                    sock.recv_multipart(zmq.NOBLOCK)
                    messages += 1
            except zmq.Again:
                pass
    sock.close(0)
    ctx.term()
    results.put(messages)


class Publisher:
    """The worker's publishing path for the built-in signals: heads and topics once per key, then per batch
    :func:`streamd.records.encode_record_payloads` + two sends per record, or one
    :func:`streamd.records.encode_batch_record` message per signal."""

    def __init__(self, sock: zmq.Socket[Any], keys: np.ndarray, mode: str) -> None:
        self.sock, self.keys, self.mode = sock, keys, mode
        key_list = keys.tolist()
        self.topics = [[topic_for(s.name, k) for k in key_list] for s in DEFAULT_SIGNALS]
        self.heads = [[record_head(s.name, k, len(s.stats)) for k in key_list] for s in DEFAULT_SIGNALS]

    def publish(self, results: list[SignalResult]) -> int:
        """Send one batch's rows; the number of messages sent."""
        messages = 0
        send = self.sock.send
        for i, (spec, result) in enumerate(zip(DEFAULT_SIGNALS, results, strict=True)):
            if not len(result.slots):
                continue
            stats = {name: result.stats[name] for name in spec.stats}
            pub_ns = time.time_ns()
            if self.mode == "batch":
                keys = self.keys[result.slots].tolist()
                self.sock.send_multipart(encode_batch_record(spec.name, keys, result.t, stats, pub_ns))
                messages += 1
                continue
            slots = result.slots.tolist()
            heads, topics = self.heads[i], self.topics[i]
            payloads = encode_record_payloads([heads[s] for s in slots], result.t, stats, pub_ns)
            for slot, payload in zip(slots, payloads, strict=True):
                send(topics[slot], SNDMORE)
                send(payload)
            messages += len(slots)
        return messages


def publish_seconds(recorded: WorkerBatches, results: list[list[SignalResult]], mode: str, runs: int) -> dict[str, Any]:
    """Median seconds to publish every batch's rows, into a subscriber process over TCP."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ready, stop, counted = CONTEXT.Event(), CONTEXT.Event(), CONTEXT.Queue()
    sink = CONTEXT.Process(target=sink_main, args=(endpoint, True, ready, stop, counted))
    sink.start()
    ready.wait(30)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 0)  # never drop: a dropped message would make publishing look cheaper
    sock.setsockopt(zmq.LINGER, 5_000)
    sock.connect(endpoint)
    time.sleep(0.5)  # let the subscription reach us
    publisher = Publisher(sock, recorded.keys, mode)
    samples, messages = [], 0
    for _ in range(runs):
        start = time.perf_counter()
        messages = sum(publisher.publish(batch) for batch in results)
        samples.append(time.perf_counter() - start)
    sock.close()
    ctx.term()
    stop.set()
    received = counted.get(timeout=60)
    sink.join(10)
    return {"seconds": statistics.median(samples), "samples": samples, "messages": messages, "received": received}


# -- forwarder ---------------------------------------------------------------------------------------


def proxy_main(inside: str, outside: str, ready: Any) -> None:
    """The supervisor's forwarder: ``zmq.proxy`` from XSUB (workers connect) to XPUB (users subscribe)."""
    ctx = zmq.Context()
    xsub, xpub = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB)
    xsub.setsockopt(zmq.RCVHWM, 1_000_000)
    xpub.setsockopt(zmq.SNDHWM, 1_000_000)
    xsub.bind(inside)
    xpub.bind(outside)
    ready.set()
    zmq.proxy(xsub, xpub)


def record_sender_main(inside: str, seconds: float, ready: Any, results: Any) -> None:
    """PUB pre-encoded two-frame records (px1s size) as fast as possible for ``seconds``."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.connect(inside)
    topic, payload = b"px1s.S0000042", bytes(120)
    ready.set()
    time.sleep(0.5)
    sent, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1_000):
            sock.send(topic, SNDMORE)
            sock.send(payload)
        sent += 1_000
    sock.close(0)
    ctx.term()
    results.put(sent)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (ZeroMQ I/O threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def forwarder_capacity(seconds: float) -> dict[str, float]:
    """Messages per CPU second of the proxy process (sender and subscriber in their own processes).

    Throughput alone would measure the Python sender; the proxy's own CPU time per forwarded message
    is what it costs on a core of its own.
    """
    inside, outside = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    ready = [CONTEXT.Event() for _ in range(3)]
    stop, counted, sent = CONTEXT.Event(), CONTEXT.Queue(), CONTEXT.Queue()
    proxy = CONTEXT.Process(target=proxy_main, args=(inside, outside, ready[0]), daemon=True)
    proxy.start()
    ready[0].wait(30)
    receiver = CONTEXT.Process(target=sink_main, args=(outside, False, ready[1], stop, counted))
    receiver.start()
    ready[1].wait(30)
    assert proxy.pid is not None
    cpu_before = process_cpu_seconds(proxy.pid)
    sender = CONTEXT.Process(target=record_sender_main, args=(inside, seconds, ready[2], sent))
    sender.start()
    sent_count = sent.get(timeout=seconds + 60)
    time.sleep(0.5)  # let the proxy and the subscriber catch up
    cpu = process_cpu_seconds(proxy.pid) - cpu_before
    stop.set()
    received = counted.get(timeout=60)
    sender.join(10)
    receiver.join(10)
    proxy.kill()
    proxy.join(10)
    return {"messages_per_cpu_s": received / max(cpu, 1e-9), "cpu_s": cpu, "sent": sent_count, "received": received}


# -- ingest (hook) ---------------------------------------------------------------------------------


def null_worker_main(index: int, paths: RuntimePaths, ledger: TickLedger, ready: Any, stop: Any, counted: Any) -> None:
    """A worker that applies nothing: it counts ticks, marks them applied and acks at once.

    With it the ingest runs exactly as in the daemon (flow control included) while the worker
    side costs nothing, so the ingest's CPU per tick is all that is measured.
    """
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(paths.worker_endpoint(index))
    ack = ctx.socket(zmq.PUSH)
    ack.connect(paths.ack_endpoint(0))
    ready.set()
    ticks = 0
    while not stop.is_set():
        if not pull.poll(100):
            continue
        while True:
            try:
                message = decode(pull.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            if isinstance(message, WorkerBatch):
                ticks += len(message.t)
                ledger.mark_applied(0, index, message.seq_start + len(message.t))
                ack.send(encode_ack(index, 0))
    counted.put(ticks)
    pull.close(0)
    ack.close(0)
    ctx.term()


def measure_ingest(feed: Feed, seconds: float) -> dict[str, float]:
    """One ingest process fed as fast as one generator goes, into null workers: ticks per ingest CPU second."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = replace(
        Config(), ingest=replace(Config().ingest, endpoints=(endpoint,)), workers=WorkersConfig(count=WORKERS)
    )
    paths = RuntimePaths.create()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = paths.metrics_dir  # the ingest writes metrics as in the daemon
    ledger = TickLedger(1, WORKERS, CONTEXT)
    stop, counted = CONTEXT.Event(), CONTEXT.Queue()
    workers = []
    for index in range(WORKERS):
        ready = CONTEXT.Event()
        worker = CONTEXT.Process(target=null_worker_main, args=(index, paths, ledger, ready, stop, counted))
        worker.start()
        ready.wait(30)
        workers.append(worker)
    parent, child = CONTEXT.Pipe()
    ingest = CONTEXT.Process(target=ingest_main, args=(IngestStart(0, 0, (0,) * WORKERS), config, paths, ledger, child))
    ingest.start()
    parent.poll(30)
    parent.recv()
    assert ingest.pid is not None
    cpu_before = process_cpu_seconds(ingest.pid)
    offer_load([endpoint], feed, 0.0, seconds)
    time.sleep(0.5)
    cpu = process_cpu_seconds(ingest.pid) - cpu_before
    parent.send(Stop())
    ingest.join(10)
    stop.set()
    ticks = sum(counted.get(timeout=10) for _ in workers)
    for worker in workers:
        worker.join(5)
    paths.remove()
    return {"ticks": float(ticks), "cpu_s": cpu, "ticks_per_cpu_s": ticks / cpu if cpu else 0.0}


def ingest_stage(quick: bool) -> dict[str, Any]:
    """The ingest's capacity per core for each wire form (string keys, Zipf, 10,000 keys), median of 3.

    Measured as ticks handed to (null) workers per CPU second of the ingest process, so a
    generator that cannot saturate it does not understate it.
    """
    seconds = 2.0 if quick else 5.0
    figures: dict[str, Any] = {}
    for form in ("map", "list", "bin"):
        runs = [measure_ingest(Feed(form, 10_000), seconds) for _ in range(3)]
        figures[form] = {"ticks_per_cpu_s": statistics.median(r["ticks_per_cpu_s"] for r in runs), "runs": runs}
    return figures


# -- the section ---------------------------------------------------------------------------------


def measure_worker_stage(quick: bool) -> dict[str, Any]:
    n = 400_000 if quick else 2_000_000
    runs = 3
    figures: dict[str, Any] = {}
    for label, n_keys, uniform in FEEDS:
        ticks = generate(n, n_keys, uniform=uniform)
        for batch in BATCH_SIZES:
            recorded = record_worker_batches(ticks, WORKERS, batch)
            engine_s = statistics.median(engine_seconds(recorded) for _ in range(runs))
            results = engine_results(recorded)
            rows = sum(len(r.slots) for batch_results in results for r in batch_results)
            published = {mode: publish_seconds(recorded, results, mode, runs) for mode in PUBLISH_MODES}
            figures[f"{label}|{batch}"] = {
                "feed": label,
                "batch": batch,
                "ticks": recorded.ticks,
                "batches": len(recorded.batches),
                "keys_in_worker": len(recorded.keys),
                "rows_per_tick": rows / recorded.ticks,
                "engine_s_per_tick": engine_s / recorded.ticks,
                "publish_s_per_tick": {mode: p["seconds"] / recorded.ticks for mode, p in published.items()},
                "messages_per_tick": {mode: p["messages"] / recorded.ticks for mode, p in published.items()},
                "publish": published,
            }
    return figures


def worker_table(figures: dict[str, Any]) -> Table:
    table = Table(
        f"(a) Worker stage, one core: Engine(DEFAULT_SIGNALS) on the batches worker 0 of {WORKERS} receives "
        "(string keys, shard_for, dense slots), then publishing its rows; median of 3",
        [
            "feed",
            "batch",
            "rows/tick",
            "engine ticks/s",
            "publish record ticks/s",
            "publish batch ticks/s",
            "worker record ticks/s",
            "worker batch ticks/s",
        ],
    )
    for f in figures.values():
        engine, publish = f["engine_s_per_tick"], f["publish_s_per_tick"]
        table.add(
            f["feed"],
            f"{f['batch']:,}",
            f"{f['rows_per_tick']:.2f}",
            rate(1 / engine),
            rate(1 / publish["record"]),
            rate(1 / publish["batch"]),
            rate(1 / (engine + publish["record"])),
            rate(1 / (engine + publish["batch"])),
        )
    table.notes += [
        "rows/tick = rows the engine returns per input tick over the three signals (one per signal per key "
        "touched by a batch); record mode sends one two-frame message per row, batch mode one per signal per batch.",
        "worker = 1 / (engine + publish) per tick: both run in the worker process. Not included: receiving and "
        "decoding the internal batch (streamd.transport), a few microseconds per batch.",
        "Publishing sends over TCP into a subscriber in another process (PUB SNDHWM 0, so nothing is dropped).",
    ]
    table.data = figures
    return table


def run(quick: bool, earlier: dict[str, Any]) -> dict[str, Any]:
    worker = measure_worker_stage(quick)
    forwarder = [forwarder_capacity(1.5 if quick else 3.0) for _ in range(1 if quick else 3)]
    forwarder_rate = statistics.median(f["messages_per_cpu_s"] for f in forwarder)
    ingest_runs = ingest_stage(quick)
    ingest = {form: figures["ticks_per_cpu_s"] for form, figures in ingest_runs.items()}
    other = Table(
        "(a) Forwarder and ingest stages, one core",
        ["stage", "capacity", "how"],
    )
    other.add(
        "forwarder (supervisor)",
        f"{rate(forwarder_rate)} messages/s",
        "zmq.proxy XSUB -> XPUB in its own process between a PUB process sending 2-frame records and a SUB "
        "process: messages forwarded per CPU second of the proxy process",
    )
    other.add(
        "ingest (one process)",
        ", ".join(f"{k} {rate(v)} ticks/s" for k, v in ingest.items()),
        "the real ingest process (flow control included) fed by one unpaced generator into null workers that "
        "ack at once: ticks handed over per CPU second of the ingest; string keys, Zipf, 10,000 keys",
    )
    other.data = {"forwarder": forwarder, "ingest": ingest_runs}
    figures = {
        "workers_recorded": WORKERS,
        "worker": worker,
        "forwarder_messages_per_s": forwarder_rate,
        "ingest_ticks_per_s": ingest,
    }
    return {"title": "5. (a) Stage capacity per core", "tables": [worker_table(worker), other], "figures": figures}
