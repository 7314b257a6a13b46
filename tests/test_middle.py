"""The middle layer without sockets: restart policy, tick ledger, the worker's key table."""

from __future__ import annotations

import multiprocessing

import numpy as np

from streamd.children import RestartPolicy
from streamd.ledger import TickLedger
from streamd.worker import KeyTable


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestRestartPolicy:
    def test_first_death_after_a_healthy_run_restarts_at_once(self) -> None:
        """A worker that ran for a while is replaced immediately."""
        clock = FakeClock()
        policy = RestartPolicy(clock, initial=0.1, maximum=5.0, stable_after=30.0)
        policy.started()
        clock.now += 60
        assert policy.died() == clock.now

    def test_a_crash_loop_backs_off_doubling_up_to_the_maximum(self) -> None:
        """Deaths right after start wait 0, 0.1, 0.2, 0.4 ... seconds, capped at the maximum."""
        clock = FakeClock()
        policy = RestartPolicy(clock, initial=0.1, maximum=0.5, stable_after=30.0)
        delays = []
        for _ in range(6):
            policy.started()
            clock.now += 1
            delays.append(round(policy.died() - clock.now, 9))
        assert delays == [0.0, 0.1, 0.2, 0.4, 0.5, 0.5]

    def test_backoff_resets_after_a_stable_run(self) -> None:
        """Once a replacement has run stable_after seconds, the next death is immediate again."""
        clock = FakeClock()
        policy = RestartPolicy(clock, initial=0.1, maximum=5.0, stable_after=30.0)
        for _ in range(3):
            policy.started()
            clock.now += 1
            policy.died()
        policy.started()
        clock.now += 31
        assert policy.died() == clock.now


class TestTickLedger:
    def test_backlog_in_flight_and_write_off(self) -> None:
        """Per (ingest, worker) cells: backlog sums ingests, write-off closes one cell's books."""
        ledger = TickLedger(2, 3, multiprocessing.get_context("spawn"))
        ledger.hand_over(0, 1, 100)
        ledger.hand_over(1, 1, 50)
        ledger.mark_applied(0, 1, 60)
        assert ledger.in_flight(0, 1) == 40
        assert ledger.backlog(1) == 90
        assert ledger.backlog(0) == 0
        assert ledger.write_off(1, 1) == 50
        assert ledger.backlog(1) == 40
        assert ledger.applied_total(1) == 110
        assert ledger.handed(0, 1) == 100


class TestKeyTable:
    def test_slots_of_several_ingests_lead_to_one_local_index_per_key(self) -> None:
        """Two ingests numbering the same keys differently share the worker's local indices."""
        table = KeyTable()
        assert table.learn(0, 0, [(0, "A"), (1, "B")]) == ["A", "B"]
        assert table.learn(1, 0, [(0, "B"), (1, "C"), (2, "A")]) == ["C"]
        np.testing.assert_array_equal(table.local(0, 0, np.array([1, 0, 1])), [1, 0, 1])
        np.testing.assert_array_equal(table.local(1, 0, np.array([0, 1, 2])), [1, 2, 0])
        assert table.keys[: table.count].tolist() == ["A", "B", "C"]

    def test_reannounced_keys_keep_their_index(self) -> None:
        """A key announced again (after a worker restart of the ingest's view) is not duplicated."""
        table = KeyTable()
        table.learn(0, 0, [(i, f"K{i}") for i in range(100)])
        assert table.learn(0, 0, [(i, f"K{i}") for i in range(100)]) == []
        assert table.count == 100

    def test_a_replaced_ingest_numbers_afresh_and_old_batches_still_resolve(self) -> None:
        """Incarnation 1 of an ingest reuses slot numbers; incarnation 0's queued batches still map right."""
        table = KeyTable()
        table.learn(0, 0, [(0, "A"), (1, "B")])
        assert table.learn(0, 1, [(0, "B"), (1, "Z")]) == ["Z"]
        np.testing.assert_array_equal(table.local(0, 0, np.array([0, 1])), [0, 1])
        np.testing.assert_array_equal(table.local(0, 1, np.array([0, 1])), [1, 2])
        table.learn(0, 2, [])
        table.learn(0, 3, [])
        assert (0, 0) not in table._tables and (0, 2) in table._tables
