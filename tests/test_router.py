"""Tests for the key router (``streamd.router``): codes, new-key announcements, the split per worker."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streamd.protocol import decode_payloads
from streamd.router import KeyRouter, Outbox
from streamd.sharding import shard_for

keys_st = st.one_of(st.sampled_from(["A", "B", "C", "D", "E", "F"]), st.integers(0, 5))


def flush_of(keys: list[Any]) -> list[bytes]:
    return [msgpack.packb([[key, i, float(i)] for i, key in enumerate(keys)])] if keys else []


class TestSplit:
    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.lists(keys_st, max_size=30), max_size=4), st.integers(1, 7))
    def test_split_matches_per_tick_reference(self, flushes: list[list[Any]], workers: int) -> None:
        """Each worker gets its keys' ticks in arrival order, at dense slots announced on first sight."""
        router = KeyRouter(workers)
        slot_of: dict[Any, tuple[int, int]] = {}
        for keys in flushes:
            outboxes = [Outbox() for _ in range(workers)]
            parts = router.split(decode_payloads(flush_of(keys), router.codes), outboxes)
            expected: list[list[tuple[int, int]]] = [[] for _ in range(workers)]
            announced: list[list[tuple[int, Any]]] = [[] for _ in range(workers)]
            for i, key in enumerate(keys):
                if key not in slot_of:
                    worker = shard_for(key, workers)
                    slot_of[key] = (worker, sum(w == worker for w, _ in slot_of.values()))
                    announced[worker].append((slot_of[key][1], key))
                worker, slot = slot_of[key]
                expected[worker].append((slot, i))
            assert [list(zip(p.slots.tolist(), p.t.tolist(), strict=True)) for p in parts] == expected
            assert [list(outbox.fresh_keys) for outbox in outboxes] == announced

    def test_split_without_known_codes(self) -> None:
        """A flush decoded without the router's codes is routed all the same."""
        router = KeyRouter(3)
        router.route(["A", "B"], [Outbox() for _ in range(3)])
        outboxes = [Outbox() for _ in range(3)]
        parts = router.split(decode_payloads(flush_of(["B", "C", "A"])), outboxes)
        codes = router.codes
        got = sorted(
            (int(t), w, int(s)) for w, part in enumerate(parts) for s, t in zip(part.slots, part.t, strict=True)
        )
        assert got == sorted((i, codes[k] % 3, codes[k] // 3) for i, k in enumerate(["B", "C", "A"]))
        assert sum(len(outbox.fresh_keys) for outbox in outboxes) == 1

    def test_many_workers_keep_arrival_order(self) -> None:
        """Past the mask threshold (a sort by worker), each worker still sees its ticks in order."""
        router = KeyRouter(16)
        keys = [f"K{i % 50}" for i in range(500)]
        parts = router.split(decode_payloads(flush_of(keys), router.codes), [Outbox() for _ in range(16)])
        assert sum(len(part.t) for part in parts) == 500
        for part in parts:
            assert np.all(np.diff(part.t) > 0)


class TestAnnouncement:
    def test_announcement_names_every_key_of_a_worker_under_its_slot(self) -> None:
        """After a worker restart its keys keep their slots and are all announced; others are untouched."""
        router = KeyRouter(2)
        keys = [f"K{i}" for i in range(20)]
        first = [Outbox(), Outbox()]
        router.route(keys, first)
        assert sorted(router.announcement(0)) == sorted(first[0].fresh_keys)
        assert sorted(router.announcement(1)) == sorted(first[1].fresh_keys)
        assert {k for _, k in router.announcement(0)} == {k for k in keys if shard_for(k, 2) == 0}
        again = [Outbox(), Outbox()]
        router.route(keys, again)
        assert not again[0].fresh_keys and not again[1].fresh_keys


def admit_all(router: KeyRouter, outboxes: list[Outbox]) -> None:
    """What the ingest does when its workers are idle: every pending key is told to its worker."""
    for worker, outbox in enumerate(outboxes):
        router.admit(worker, outbox, len(outbox.fresh_keys))


def sent(router: KeyRouter, outboxes: list[Outbox]) -> list[list[int]]:
    """What the ingest does when a batch leaves: the gone slots go, and become reusable."""
    gone = [outbox.gone for outbox in outboxes]
    for worker, slots in enumerate(gone):
        router.recycle(worker, slots)
        outboxes[worker].gone = []
    return gone


class TestEviction:
    def test_silent_keys_are_released_and_their_slots_reused_after_the_gone_batch(self) -> None:
        """A key silent past the cut is dropped from the codes; its slot is reused only once announced gone."""
        router = KeyRouter(1)
        outboxes = [Outbox()]
        router.epoch = 1
        router.route(["A", "B", "C"], outboxes)
        admit_all(router, outboxes)
        router.epoch = 5
        router.route(["B"], outboxes)
        assert router.evict_silent(3, outboxes, now_ns=0) == 2
        assert set(router.codes) == {"B"}
        assert sorted(outboxes[0].gone) == [0, 2]
        router.route(["D"], outboxes)
        assert router.codes["D"] == 3, "a released slot is not reused before its gone batch left"
        assert sorted(sent(router, outboxes)[0]) == [0, 2]
        admit_all(router, outboxes)
        outboxes[0].new_keys.clear()
        router.route(["E", "A"], outboxes)
        admit_all(router, outboxes)
        assert {router.codes["E"], router.codes["A"]} == {0, 2}
        assert {k for _, k in outboxes[0].new_keys} == {"E", "A"}, "a returning key is announced as new"

    @settings(max_examples=50, deadline=None)
    @given(
        st.lists(st.booleans(), min_size=1, max_size=60),
        st.integers(1, 3),
        st.integers(1, 9),
        st.integers(1, 5),
    )
    def test_a_pass_in_steps_releases_what_one_call_would(
        self, silent: list[bool], workers: int, look: int, release: int
    ) -> None:
        """Steps of at most ``release`` keys, each looking at ``look`` codes, release exactly the silent keys."""
        routers = [KeyRouter(workers), KeyRouter(workers)]
        outboxes = [[Outbox() for _ in range(workers)] for _ in routers]
        keys = [f"K{i}" for i in range(len(silent))]
        for router, boxes in zip(routers, outboxes, strict=True):
            router.epoch = 1
            router.route(keys, boxes)
            admit_all(router, boxes)
            router.epoch = 5
            router.route([key for key, quiet in zip(keys, silent, strict=True) if not quiet], boxes)
        whole, stepped = routers
        assert whole.evict_silent(3, outboxes[0], now_ns=0) == sum(silent)
        steps = []
        while True:
            steps.append(stepped.evict_silent(3, outboxes[1], now_ns=0, step=(look, release)))
            if not stepped.sweeping:
                break
        assert max(steps) <= release
        codes = max(stepped.next_slot) * workers  # every step moves on by at least min(look, release) codes
        assert len(steps) <= -(-codes // min(look, release)) + 1
        assert set(stepped.codes) == set(whole.codes)
        assert [sorted(box.gone) for box in outboxes[1]] == [sorted(box.gone) for box in outboxes[0]]

    def test_releasing_slots_are_announced_to_a_replacement_worker(self) -> None:
        """After a worker restart the replacement learns released slots too, since their gone is still to come."""
        router = KeyRouter(2)
        outboxes = [Outbox(), Outbox()]
        keys = [f"K{i}" for i in range(10)]
        router.route(keys, outboxes)
        admit_all(router, outboxes)
        router.epoch = 10
        router.evict_silent(5, outboxes, now_ns=0)
        for worker in (0, 1):
            assert sorted(s for s, _ in router.announcement(worker)) == sorted(outboxes[worker].gone)
        sent(router, outboxes)
        assert router.announcement(0) == router.announcement(1) == []

    @settings(max_examples=50, deadline=None)
    @given(st.lists(st.lists(st.integers(0, 30), max_size=20), max_size=12), st.integers(1, 3))
    def test_slots_stay_unique_and_bounded_under_churn(self, rounds: list[list[int]], workers: int) -> None:
        """Live keys never share a slot, and slots in use stay below the most keys ever live at once."""
        router = KeyRouter(workers)
        outboxes = [Outbox() for _ in range(workers)]
        most = [0] * workers
        for epoch, keys in enumerate(rounds):
            router.epoch = epoch
            router.route([f"K{k}" for k in keys], outboxes)
            admit_all(router, outboxes)
            codes = list(router.codes.values())
            assert len(set(codes)) == len(codes)
            for worker in range(workers):
                most[worker] = max(most[worker], sum(code % workers == worker for code in codes))
            router.evict_silent(epoch, outboxes, now_ns=0)
            sent(router, outboxes)
        assert all(top <= bound for top, bound in zip(router.next_slot, most, strict=True))

    def test_route_marks_ticks_as_seen(self) -> None:
        """A key that keeps ticking is never released."""
        router = KeyRouter(1)
        outboxes = [Outbox()]
        for epoch in range(10):
            router.epoch = epoch
            router.split(decode_payloads(flush_of(["live"]), router.codes), outboxes)
            if epoch == 0:
                router.route(["quiet"], outboxes)
            admit_all(router, outboxes)
            router.evict_silent(epoch - 3, outboxes, now_ns=0)
        assert set(router.codes) == {"live"}


class TestFreshLane:
    @settings(max_examples=100, deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.tuples(st.just("flush"), st.lists(st.integers(0, 12), max_size=15)),
                st.tuples(st.just("send"), st.tuples(st.integers(0, 2), st.integers(0, 3))),
            ),
            max_size=25,
        ),
        st.integers(1, 3),
    )
    def test_new_keys_wait_in_their_lane_without_reordering_any_key(
        self, steps: list[tuple[str, Any]], workers: int
    ) -> None:
        """However flushes and sends with any admission budget interleave, each worker gets every tick
        once, each key's ticks in arrival order, and a key's announcement before its first tick."""
        router = KeyRouter(workers)
        outboxes = [Outbox() for _ in range(workers)]
        delivered: dict[Any, list[int]] = {}
        known: list[dict[int, Any]] = [{} for _ in range(workers)]
        arrived: dict[Any, list[int]] = {}
        clock = 0

        def send(worker: int, budget: int) -> None:
            outbox = outboxes[worker]
            parts = list(outbox.parts)
            admitted = router.admit(worker, outbox, budget)
            if admitted is not None:
                parts.append(admitted)
            known[worker].update(outbox.new_keys)
            assert outbox.fresh_ticks == sum(len(part[0]) for part in outbox.fresh_parts)
            outboxes[worker] = outbox.fresh_lane()
            for slots, t, _, _ in parts:
                for slot, tick in zip(slots.tolist(), t.tolist(), strict=True):
                    assert slot in known[worker], "a tick reached its worker before its key was announced"
                    delivered.setdefault(known[worker][slot], []).append(tick)

        for kind, arg in steps:
            if kind == "flush":
                keys = [f"K{k}" for k in arg]
                payload = msgpack.packb([[key, clock + i, 1.0] for i, key in enumerate(keys)])
                for i, key in enumerate(keys):
                    arrived.setdefault(key, []).append(clock + i)
                clock += len(keys)
                for worker, part in enumerate(router.split(decode_payloads([payload], router.codes), outboxes)):
                    slots, t, p, q, pending = part
                    if pending is None:
                        outboxes[worker].add((slots, t, p, q), 0)
                    else:
                        assert pending.any()
                        outboxes[worker].add((slots[~pending], t[~pending], p[~pending], q[~pending]), 0)
                        fresh = (slots[pending], t[pending], p[pending], q[pending])
                        outboxes[worker].add_fresh(fresh, 0, router.floor(worker, slots[pending]))
            elif arg[0] < workers:
                send(*arg)
        for worker in range(workers):
            send(worker, len(outboxes[worker].fresh_keys))
            assert outboxes[worker].fresh_ticks == 0 and not outboxes[worker].fresh_parts
        assert delivered == arrived

    def test_a_pending_key_is_never_evicted(self) -> None:
        """Its ticks are still in the fresh lane: releasing its slot now would unmap a key never mapped."""
        router = KeyRouter(1)
        outboxes = [Outbox()]
        router.epoch = 1
        router.route(["told", "waiting"], outboxes)
        router.admit(0, outboxes[0], 1)
        router.epoch = 9
        assert router.evict_silent(5, outboxes, now_ns=0) == 1
        assert set(router.codes) == {"waiting"}

    def test_refused_new_keys_are_counted_and_known_keys_flow(self) -> None:
        router = KeyRouter(1)
        outboxes = [Outbox()]
        router.route(["A"], outboxes)
        router.accept_new = False
        parts = router.split(decode_payloads(flush_of(["A", "B", "B", "A"]), router.codes), outboxes)
        assert parts[0].t.tolist() == [0, 3]
        assert (router.rejected_ticks, router.rejected_keys) == (2, 1)
        assert set(router.codes) == {"A"}


class TestMaxKeys:
    def test_new_keys_beyond_the_limit_are_rejected_and_known_keys_flow(self) -> None:
        """Ticks of keys past max_keys are left out and counted; keys already routed are unaffected."""
        router = KeyRouter(2, max_keys=3)
        outboxes = [Outbox(), Outbox()]
        parts = router.split(decode_payloads(flush_of(["A", "B", "C", "D", "A", "E", "D"]), router.codes), outboxes)
        assert sum(len(p.t) for p in parts) == 4
        assert router.rejected_ticks == 3
        assert router.rejected_keys == 2
        assert set(router.codes) == {"A", "B", "C"}
        parts = router.split(decode_payloads(flush_of(["C", "B"]), router.codes), outboxes)
        assert sum(len(p.t) for p in parts) == 2
        assert router.rejected_ticks == 0

    def test_evicted_keys_make_room(self) -> None:
        """Once a key is released, a new key may take its place under the limit."""
        router = KeyRouter(1, max_keys=1)
        outboxes = [Outbox()]
        router.route(["A"], outboxes)
        admit_all(router, outboxes)
        router.epoch = 9
        router.evict_silent(5, outboxes, now_ns=0)
        codes = router.route(["B"], outboxes)
        assert codes.tolist() == [1]
        assert router.rejected_ticks == 0
