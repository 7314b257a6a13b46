"""Tests for the worker's key table (``streamd.keytable``): mapping, release by every ingest, the free list."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streamd.keytable import KeyTable


def local_of(table: KeyTable, ingest: int, slots: list[int]) -> list[int]:
    return table.local(ingest, 0, np.array(slots, np.int64)).tolist()


def release(table: KeyTable) -> list[int]:
    """What the worker does after its engine call: drop the dying indices' state, then recycle them."""
    dying = table.take_dying()
    table.recycle(dying)
    return sorted(dying.tolist())


class TestKeyTable:
    def test_a_key_released_by_its_only_ingest_dies_and_its_index_is_reused(self) -> None:
        """Gone slots unmap; the index is reused by the next new key, after it was recycled."""
        table = KeyTable()
        assert table.learn(0, 0, [(0, "A"), (1, "B")]) == ["A", "B"]
        assert local_of(table, 0, [0, 1, 1]) == [0, 1, 1]
        table.forget(0, 0, [0])
        assert table.live == 1
        table.learn(0, 0, [(2, "C")])
        assert local_of(table, 0, [2]) == [2], "a dying index is not reused before its state is dropped"
        assert release(table) == [0]
        assert table.keys[0] is None
        table.learn(0, 0, [(0, "D")])
        assert local_of(table, 0, [0]) == [0]
        assert table.keys[0] == "D"
        assert table.count == 3

    def test_dying_indices_are_taken_oldest_first_in_steps(self) -> None:
        """take_dying(most) hands out at most ``most`` indices in the order they died; the rest wait."""
        table = KeyTable()
        table.learn(0, 0, [(slot, f"K{slot}") for slot in range(10)])
        table.forget(0, 0, [4, 1, 7])
        table.forget(0, 0, [0, 9])
        assert table.dying == 5
        assert table.take_dying(2).tolist() == [4, 1]
        table.forget(0, 0, [3])
        assert table.take_dying(3).tolist() == [7, 0, 9]
        assert table.take_dying().tolist() == [3]
        assert table.dying == 0 and table.take_dying(5).size == 0

    def test_a_key_lives_while_any_ingest_maps_it(self) -> None:
        """The same key from two ingests is one index; it dies only when both released it."""
        table = KeyTable()
        table.learn(0, 0, [(5, "K")])
        table.learn(1, 0, [(0, "K")])
        assert local_of(table, 0, [5]) == local_of(table, 1, [0]) == [0]
        table.forget(0, 0, [5])
        assert release(table) == []
        assert table.live == 1
        table.forget(1, 0, [0])
        assert release(table) == [0]
        assert table.live == 0

    def test_a_returning_key_gets_a_fresh_index(self) -> None:
        """Released and announced again in the same drain: a new index, not the dying one."""
        table = KeyTable()
        table.learn(0, 0, [(0, "A")])
        table.forget(0, 0, [0])
        table.learn(0, 0, [(0, "A")])
        assert local_of(table, 0, [0]) == [1]
        assert release(table) == [0]

    def test_integer_and_string_keys_stay_distinct(self) -> None:
        """The int 5 and the str "5" are different keys, kept as they came."""
        table = KeyTable()
        table.learn(0, 0, [(0, 5), (1, "5")])
        assert table.keys[:2].tolist() == [5, "5"]

    def test_restored_keys_no_ingest_announces_within_the_ttl_die_and_claimed_ones_stay(self) -> None:
        """After a restart nothing else would release a restored key that never comes back."""
        table = KeyTable()
        table.restore(["A", None, "B", "C"], now=100.0)
        table.learn(0, 0, [(0, "B")])  # B comes back: its restored index, claimed by slot 0
        table.retire_unclaimed(now=104.0, ttl=5.0)
        assert release(table) == []  # too early
        table.retire_unclaimed(now=105.5, ttl=5.0)
        assert release(table) == [0, 3]  # A and C
        assert table.live == 1 and local_of(table, 0, [0]) == [2]
        table.retire_unclaimed(now=200.0, ttl=5.0)
        assert release(table) == []  # once only
        assert table.learn(0, 0, [(1, "A")]) == ["A"]  # A returns as a new key, on a recycled index

    def test_a_restored_key_released_before_the_ttl_is_not_released_twice(self) -> None:
        table = KeyTable()
        table.restore(["A", "B"], now=0.0)
        table.learn(0, 0, [(0, "A")])
        table.forget(0, 0, [0])  # A claimed, then evicted by its ingest: dying now
        assert release(table) == [0]
        table.learn(0, 0, [(1, "D")])  # D reuses A's index and holds it
        table.retire_unclaimed(now=10.0, ttl=5.0)
        assert release(table) == [1]  # only B
        assert table.keys[0] == "D"

    def test_a_replaced_ingest_incarnation_is_retired_after_the_grace(self) -> None:
        """Keys only a dead incarnation mapped die once its successor is there and it stayed silent."""
        table = KeyTable()
        table.learn(0, 0, [(0, "old"), (1, "both")])
        table.local(0, 0, np.array([0]), now=10.0)
        table.learn(0, 1, [(0, "both")])
        table.retire_superseded(now=12.0, grace=5.0)
        assert release(table) == []
        table.retire_superseded(now=16.0, grace=5.0)
        assert release(table) == [0]
        assert table.live == 1

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 8), st.booleans()), max_size=60))
    def test_matches_a_reference_of_live_mappings(self, steps: list[tuple[int, int, bool]]) -> None:
        """Against a dict reference: every mapped slot leads to its key, indices stay below the most live."""
        table = KeyTable()
        slot_of: list[dict[str, int]] = [{}, {}]
        next_slot = [0, 0]
        most = 0
        for ingest, key_id, drop in steps:
            key = f"K{key_id}"
            mapping = slot_of[ingest]
            if drop and key in mapping:
                table.forget(ingest, 0, [mapping.pop(key)])
            elif not drop and key not in mapping:
                mapping[key] = next_slot[ingest]
                next_slot[ingest] += 1
                table.learn(ingest, 0, [(mapping[key], key)])
            release(table)
            live = set(slot_of[0]) | set(slot_of[1])
            most = max(most, len(live))
            assert table.live == len(live)
            for i in (0, 1):
                for k, slot in slot_of[i].items():
                    assert table.keys[local_of(table, i, [slot])[0]] == k
        assert table.count <= most
