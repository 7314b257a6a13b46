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
            assert [outbox.new_keys for outbox in outboxes] == announced

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
        assert sum(len(outbox.new_keys) for outbox in outboxes) == 1

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
        assert sorted(router.announcement(0)) == sorted(first[0].new_keys)
        assert sorted(router.announcement(1)) == sorted(first[1].new_keys)
        assert {k for _, k in router.announcement(0)} == {k for k in keys if shard_for(k, 2) == 0}
        again = [Outbox(), Outbox()]
        router.route(keys, again)
        assert again[0].new_keys == again[1].new_keys == []
