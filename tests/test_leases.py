"""Leases: balanced sticky assignment (pure), and managers on a real 3-node cluster that never share a partition."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import nats.js.errors
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamd.jetstream import connect
from streamd.leases import LeaseEvent, LeaseManager, assign
from tests.natscluster import NatsCluster, nats_cluster

names = st.lists(st.text("abcdefgh", min_size=1, max_size=4), min_size=1, max_size=7, unique=True)


def loads(assignment: dict[int, str]) -> Counter[str]:
    return Counter(assignment.values())


@given(st.integers(1, 200), names)
def test_assignment_is_complete_balanced_and_a_fixed_point(partitions: int, members: list[str]) -> None:
    """Every partition has one member, loads differ by at most one, and re-applying changes nothing."""
    first = assign(partitions, members, {})
    assert sorted(first) == list(range(partitions))
    counts = [loads(first)[m] for m in members]
    assert max(counts) - min(counts) <= 1
    assert assign(partitions, members, first) == first


@given(st.integers(1, 200), names.filter(lambda m: len(m) >= 2), st.data())
def test_a_member_leaving_moves_only_its_partitions(partitions: int, members: list[str], data: st.DataObject) -> None:
    """Survivors keep everything they had; only the leaver's partitions move."""
    before = assign(partitions, members, {})
    leaver = data.draw(st.sampled_from(members))
    after = assign(partitions, [m for m in members if m != leaver], before)
    moved = {p for p in before if before[p] != after[p]}
    assert moved == {p for p, m in before.items() if m == leaver}


@given(st.integers(1, 200), names, st.text("xyz", min_size=1, max_size=3))
def test_a_member_joining_takes_about_its_share(partitions: int, members: list[str], joiner: str) -> None:
    """A new member takes its quota, all from others, and nothing else moves."""
    before = assign(partitions, members, {})
    after = assign(partitions, [*members, joiner], before)
    moved = {p for p in before if before[p] != after[p]}
    assert all(after[p] == joiner for p in moved)
    share = partitions // (len(members) + 1)
    assert len(moved) == loads(after)[joiner] in (share, share + 1)


async def watch_overlaps(managers: list[LeaseManager], stop: asyncio.Event, overlaps: list[str]) -> None:
    """Every 20 ms, one instant's view of every manager: no partition may have two owners."""
    while not stop.is_set():
        seen: dict[int, str] = {}
        for manager in managers:
            for partition in manager.owned():
                if partition in seen:
                    overlaps.append(f"partition {partition}: {seen[partition]} and {manager.name}")
                seen[partition] = manager.name
        await asyncio.sleep(0.02)


async def until(predicate: object, timeout: float) -> float:
    """Seconds until ``predicate()`` holds (polled every 20 ms); raises after ``timeout``."""
    assert callable(predicate)
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            msg = f"condition not met within {timeout} s"
            raise AssertionError(msg)
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def union(managers: list[LeaseManager]) -> set[int]:
    return {p for m in managers for p in m.owned()}


async def lease_scenario(urls: list[str], partitions: int, ttl: float) -> dict[str, float]:
    """Three managers share partitions; one leaves gracefully, one crashes; ownership is always exclusive."""
    connections = [await connect(urls[i:] + urls[:i], f"m{i}") for i in range(3)]
    events: list[LeaseEvent] = []
    managers = [
        LeaseManager(nc, f"host-{i}", partitions, ttl, on_change=events.append) for i, nc in enumerate(connections)
    ]
    stop = asyncio.Event()
    overlaps: list[str] = []
    monitor = asyncio.create_task(watch_overlaps(managers, stop, overlaps))
    await asyncio.gather(*(m.start() for m in managers))
    figures = {"initial": await until(lambda: len(union(managers)) == partitions, 10 * ttl)}
    await asyncio.sleep(ttl)  # settle: no more moves once balanced
    counts = sorted(len(m.owned()) for m in managers)
    assert counts[-1] - counts[0] <= 1, counts

    keeper, leaver, crasher = managers
    kept = set(keeper.owned())
    started = time.monotonic()
    await leaver.stop()
    figures["graceful"] = await until(lambda: len(union([keeper, crasher])) == partitions, 3 * ttl)
    assert kept <= set(keeper.owned()), "a survivor lost a partition it held when another left"
    assert time.monotonic() - started < ttl, "graceful release should not wait for the TTL"

    await until(lambda: abs(len(keeper.owned()) - len(crasher.owned())) <= 1, 3 * ttl)
    await crasher.stop(release=False)
    figures["crash"] = await until(lambda: len(keeper.owned()) == partitions, 4 * ttl)
    assert crasher.owned() == {}, "a crashed owner still claims partitions after the takeover"
    assert figures["crash"] < ttl + keeper.interval_s + 1.5, figures

    stop.set()
    await monitor
    await keeper.stop()
    for nc in connections:
        await nc.close()
    assert not overlaps, overlaps[:5]
    assert_tokens_increase(events)
    return figures


def assert_tokens_increase(events: list[LeaseEvent]) -> None:
    """Fencing: each new ownership term of a partition has a larger token than every earlier one."""
    acquired: dict[int, list[int]] = {}
    for event in events:
        if event.kind == "acquired":
            acquired.setdefault(event.partition, []).append(event.token)
    assert any(len(tokens) > 1 for tokens in acquired.values())
    for tokens in acquired.values():
        assert tokens == sorted(set(tokens))


@pytest.mark.cluster  # timing-sensitive against a young cluster: run alone (Makefile)
@pytest.mark.timeout(90)
def test_managers_balance_hand_over_and_take_over_without_overlap(tmp_path: Path) -> None:
    """Balanced start, graceful release -> immediate takeover, crash -> takeover within TTL + a heartbeat."""
    with nats_cluster(tmp_path, size=3) as cluster:
        figures = asyncio.run(asyncio.wait_for(lease_scenario(cluster.urls, partitions=24, ttl=2.0), 70))
    print("lease figures (s):", {k: round(v, 2) for k, v in figures.items()})


async def release_after_unrecorded_renewal(urls: list[str]) -> list[bytes | None]:
    """A renewal that landed but whose ack never came back (cut short by ``stop``), then a graceful stop."""
    nc = await connect(urls, "m-stale")
    manager = LeaseManager(nc, "stale", 2, 30.0, replicas=1)  # a 10 s heartbeat: no renewal of its own
    await manager.start()
    await until(lambda: len(manager.owned()) == 2, 20)
    for partition in manager.owned():
        entry = await manager.kv.get(f"lease.{partition}")
        await manager.kv.update(f"lease.{partition}", b"stale", last=entry.revision)
    await manager.stop()
    left = []
    for partition in range(2):
        try:
            left.append((await manager.kv.get(f"lease.{partition}")).value)
        except nats.js.errors.KeyNotFoundError:  # deleted (KeyDeletedError is a subclass)
            left.append(None)
    await nc.close()
    return left


@pytest.mark.cluster  # timing-sensitive against a young cluster: run alone (Makefile)
@pytest.mark.timeout(60)
def test_a_graceful_stop_frees_leases_whose_last_renewal_was_never_acknowledged(tmp_path: Path) -> None:
    """Otherwise the stale revision fails the delete and successors wait out the whole TTL."""
    with nats_cluster(tmp_path, size=1) as cluster:
        left = asyncio.run(asyncio.wait_for(release_after_unrecorded_renewal(cluster.urls), 40))
    assert left == [None, None]


async def reclaim_after_outage(cluster: NatsCluster, ttl: float) -> tuple[float, dict[int, int], dict[int, int]]:
    """The only server goes away for longer than the leases last, then comes back."""
    nc = await connect(cluster.urls, "m-outage")
    manager = LeaseManager(nc, "solo", 2, ttl, replicas=1)
    await manager.start()
    await until(lambda: len(manager.owned()) == 2, 20)
    before = manager.owned()
    name = cluster.nodes[0].name
    cluster.kill(name)
    await until(lambda: not manager.owned(), 2 * ttl)
    await asyncio.to_thread(cluster.restart, name)
    took = await until(lambda: len(manager.owned()) == 2, 2 * ttl)
    after = manager.owned()
    await manager.stop()
    await nc.close()
    return took, before, after


@pytest.mark.cluster  # timing-sensitive against a young cluster: run alone (Makefile)
@pytest.mark.timeout(90)
def test_a_lease_that_lapsed_while_the_bucket_was_away_is_taken_back_at_once(tmp_path: Path) -> None:
    """Not a whole TTL later: a rebuilt view reads our own stale entries as fresh for a TTL, so the
    holder takes its leases back by compare-and-set on the revision it last wrote, in a new term."""
    ttl = 12.0
    with nats_cluster(tmp_path, size=1) as cluster:
        took, before, after = asyncio.run(asyncio.wait_for(reclaim_after_outage(cluster, ttl), 80))
    print(f"leases back {took:.2f} s after the server")
    assert set(after) == set(before)
    assert all(after[p] > before[p] for p in after), "a lease taken back starts a new term with a larger token"
    assert took < ttl / 2
