"""JetStream wrappers on a real 3-node cluster: idempotent publishes, ordered reads, a stream leader killed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from streamd.jetstream import (
    TICKS_STREAM,
    Delivery,
    OrderedReader,
    PartitionPublisher,
    connect,
    ensure_ticks_stream,
    publish_idempotent,
    ticks_subject,
)
from tests.natscluster import NatsCluster, nats_cluster

pytestmark = pytest.mark.cluster  # a young 3-server cluster times out beside other test files: run alone


def run(coro: Awaitable[None], timeout: float) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, timeout)

    asyncio.run(bounded())


async def read(reader: OrderedReader, count: int) -> list[Delivery]:
    out: list[Delivery] = []
    async for delivery in reader:
        out.append(delivery)
        if len(out) == count:
            break
    return out


async def produce_until(stop: asyncio.Event, js: JetStreamContext, acked: list[bytes], gaps: list[float]) -> None:
    """Publish numbered batches one at a time on partition 5, noting each ack and the time since the last."""
    last = time.monotonic()
    n = 0
    while not stop.is_set():
        payload = f"b{n}".encode()
        await publish_idempotent(js, ticks_subject(5), payload, f"kill.{n}", timeout=20)
        acked.append(payload)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
        n += 1


async def consume(reader: OrderedReader, seen: list[Delivery]) -> None:
    async for delivery in reader:
        seen.append(delivery)


def with_cluster(tmp_path: Path, body: Callable[[NatsCluster], Awaitable[None]], timeout: float) -> None:
    with nats_cluster(tmp_path, size=3) as cluster:
        run(body(cluster), timeout)


@pytest.mark.timeout(60)
def test_publish_and_read_back_by_sequence_and_time(tmp_path: Path) -> None:
    """Batches published on several partitions come back per partition, in order, from a sequence or a time."""

    async def body(cluster: NatsCluster) -> None:
        nc = await connect(cluster.urls, "test")
        js = nc.jetstream()
        info = await ensure_ticks_stream(js, replicas=3)
        assert info.config.num_replicas == 3
        assert (await ensure_ticks_stream(js, replicas=3)).config.num_replicas == 3  # idempotent
        publisher = PartitionPublisher(js, "host-a", partitions=4)
        publisher.start()
        for i in range(200):
            assert publisher.submit(i % 4, f"{i}".encode())
        await publisher.flush()
        assert publisher.stats.published == 200
        assert publisher.stats.dropped == publisher.stats.failed == 0

        got = await read(OrderedReader(nc, TICKS_STREAM, ticks_subject(2)), 50)
        assert [d.payload for d in got] == [f"{i}".encode() for i in range(2, 200, 4)]
        assert got[-1].pending == 0
        assert [d.seq for d in got] == sorted(d.seq for d in got)

        middle = got[25]
        from_seq = await read(OrderedReader(nc, TICKS_STREAM, ticks_subject(2), start_seq=middle.seq), 25)
        assert from_seq == got[25:]
        await asyncio.sleep(0.05)
        cut = time.time_ns()
        await asyncio.sleep(0.05)
        await publish_idempotent(js, ticks_subject(2), b"late", "late-1", timeout=5)
        from_time = await read(OrderedReader(nc, TICKS_STREAM, ticks_subject(2), start_time_ns=cut), 1)
        assert [d.payload for d in from_time] == [b"late"]
        await publisher.close()
        await nc.close()

    with_cluster(tmp_path, body, 45)


@pytest.mark.timeout(60)
def test_a_retry_with_the_same_id_is_stored_once(tmp_path: Path) -> None:
    """Publishing twice with one Nats-Msg-Id stores one message; the second ack says duplicate."""

    async def body(cluster: NatsCluster) -> None:
        nc = await connect(cluster.urls, "test")
        js = nc.jetstream()
        await ensure_ticks_stream(js, replicas=3)
        first = await publish_idempotent(js, ticks_subject(0), b"batch", "host-a.1.0.1", timeout=5)
        again = await publish_idempotent(js, ticks_subject(0), b"batch", "host-a.1.0.1", timeout=5)
        assert not first.ack.duplicate
        assert again.ack.duplicate
        assert again.ack.seq == first.ack.seq
        assert (await js.stream_info(TICKS_STREAM)).state.messages == 1
        await nc.close()

    with_cluster(tmp_path, body, 45)


@pytest.mark.timeout(90)
def test_killing_the_stream_leader_stalls_briefly_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """kill -9 of the stream leader mid-run: publishing stalls < 10 s, every acknowledged batch is read back once."""

    async def body(cluster: NatsCluster) -> None:
        nc = await connect(cluster.urls, "publisher")
        reader_nc = await connect(cluster.urls[::-1], "reader")
        js = nc.jetstream()
        await ensure_ticks_stream(js, replicas=3)
        acked: list[bytes] = []
        gaps: list[float] = []
        stop = asyncio.Event()
        seen: list[Delivery] = []
        reader = OrderedReader(reader_nc, TICKS_STREAM, ticks_subject(5), heartbeat=0.5)
        producer = asyncio.create_task(produce_until(stop, js, acked, gaps))
        consumer = asyncio.create_task(consume(reader, seen))
        await asyncio.sleep(1.0)
        leader = (await js.stream_info(TICKS_STREAM)).cluster.leader  # type: ignore[union-attr]
        assert leader is not None
        cluster.kill(leader)
        before = len(acked)
        deadline = time.monotonic() + 20
        while len(acked) < before + 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        stop.set()
        await producer
        while len(seen) < len(acked) and time.monotonic() < deadline + 10:
            await asyncio.sleep(0.1)
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)

        stall = max(gaps)
        print(f"leader {leader} killed: stall {stall:.2f} s, {len(acked)} acked, {len(seen)} read", reader.stats)
        assert len(acked) > before + 100, "publishing did not resume after the leader was killed"
        assert stall < 10
        payloads = [d.payload for d in seen]
        assert len(payloads) == len(set(payloads)), "a batch was read twice"
        assert set(acked) <= set(payloads), "an acknowledged batch is missing"
        assert [d.seq for d in seen] == sorted(d.seq for d in seen)
        await nc.close()
        await reader_nc.close()

    with_cluster(tmp_path, body, 75)
