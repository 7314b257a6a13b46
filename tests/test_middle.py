"""The middle layer in process: restart policy, ledger, key table, publisher and throttle (no daemon)."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from streamd.children import RestartPolicy
from streamd.config import LatencyConfig, SignalSpec
from streamd.ingest import fresh_keys_to_send, leaves_by, send_now
from streamd.ledger import TickLedger
from streamd.metrics import SupervisorCollector, SupervisorView, WorkerMetrics
from streamd.publisher import SignalPublisher, Subscriptions, Throttle
from streamd.router import Outbox
from streamd.windows import SignalResult
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


@contextlib.contextmanager
def pub_sub_pair(name: str, hwm: int | None = None) -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    """A publisher's socket and a subscriber to everything on it, over ``inproc://name``, connected;
    with ``hwm``, both queues hold that many messages and a full one refuses a send (XPUB_NODROP)."""
    ctx = zmq.Context()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    try:
        for sock in (pub, sub):
            sock.setsockopt(zmq.LINGER, 0)
        if hwm is not None:
            pub.setsockopt(zmq.SNDHWM, hwm)
            pub.setsockopt(zmq.XPUB_NODROP, 1)
            sub.setsockopt(zmq.RCVHWM, hwm)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        pub.bind(f"inproc://{name}")
        sub.connect(f"inproc://{name}")
        time.sleep(0.05)
        yield pub, sub
    finally:
        pub.close(0)
        sub.close(0)
        ctx.term()


def received(sub: zmq.Socket[Any]) -> list[list[bytes]]:
    """Every message the subscriber holds, once the sends have had time to arrive."""
    time.sleep(0.05)
    messages = []
    while sub.poll(0):
        messages.append(sub.recv_multipart())
    return messages


def subscribed_to_everything() -> Subscriptions:
    everything = Subscriptions()
    everything.apply(b"\x01")
    return everything


class TestSignalPublisher:
    def test_rows_over_the_high_water_mark_are_dropped_and_counted_not_published(self) -> None:
        """A subscriber that never reads: published + dropped == rows, and drops are not called published."""
        registry = CollectorRegistry()
        metrics = WorkerMetrics(0, registry=registry)
        with pub_sub_pair("publisher-test", hwm=5) as (pub, _):
            spec = SignalSpec("s", "count", 3, ("mean",))
            publisher = SignalPublisher(spec, pub, metrics, subscribed_to_everything())
            keys = [f"K{i}" for i in range(100)]
            slots = np.arange(100)
            result = SignalResult(slots, np.arange(100), {"mean": np.ones(100)})
            publisher.publish(result, np.array(keys, dtype=object))
        published = registry.get_sample_value("streamd_signals_published_total", {"signal": "s"})
        dropped = registry.get_sample_value("streamd_publish_dropped_total", {"signal": "s"})
        assert published is not None and dropped is not None
        assert published + dropped == 100
        assert 0 < published < 100

    def test_rows_no_subscriber_wants_are_counted_but_never_sent(self) -> None:
        """Only rows whose topic a subscription prefixes leave; the rest count as published, and a
        new subscription is honoured from the next batch on."""
        registry = CollectorRegistry()
        metrics = WorkerMetrics(0, registry=registry)
        subscriptions = Subscriptions()
        subscriptions.apply(b"\x01s.K1")
        with pub_sub_pair("publisher-subscriptions") as (pub, sub):
            publisher = SignalPublisher(SignalSpec("s", "count", 3, ("mean",)), pub, metrics, subscriptions)
            keys = np.array([f"K{i}" for i in range(30)], dtype=object)
            result = SignalResult(np.arange(30), np.arange(30), {"mean": np.ones(30)})
            publisher.publish(result, keys)
            subscriptions.apply(b"\x01s.K2")
            subscriptions.apply(b"\x00s.K1")
            publisher.publish(result, keys)
            topics = [message[0].decode() for message in received(sub)]
        first = ["s.K1"] + [f"s.K{i}" for i in range(10, 20)]
        second = ["s.K2"] + [f"s.K{i}" for i in range(20, 30)]
        assert topics == first + second
        assert registry.get_sample_value("streamd_signals_published_total", {"signal": "s"}) == 60
        assert registry.get_sample_value("streamd_publish_messages_total", {"signal": "s"}) == 22

    def test_emit_interval_stamps_each_record_with_the_reading_that_admitted_it(self, monkeypatch) -> None:
        """A key's ``pub_ns`` stamps are at least ``emit_interval`` apart, however long encoding takes:
        the clock is read once per send, and that reading both admits the rows and stamps them."""
        readings = itertools.accumulate(itertools.cycle([400, 300, 20]))  # sends of uneven length
        monkeypatch.setattr("streamd.publisher.time.time_ns", lambda: next(readings))
        registry = CollectorRegistry()
        with pub_sub_pair("publisher-interval") as (pub, sub):
            spec = SignalSpec("s", "count", 3, ("mean",), emit_interval_ns=1_000)
            publisher = SignalPublisher(spec, pub, WorkerMetrics(0, registry=registry), subscribed_to_everything())
            keys = np.array(["K"], dtype=object)
            for t in range(30):
                publisher.publish(SignalResult(np.array([0]), np.array([t]), {"mean": np.ones(1)}), keys)
                publisher.flush_due(keys)
            stamps = [msgpack.unpackb(message[1])["pub_ns"] for message in received(sub)]
        assert len(stamps) >= 5
        assert all(b - a >= 1_000 for a, b in itertools.pairwise(stamps))


class TestSubscriptions:
    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.tuples(st.booleans(), st.binary(max_size=4)), max_size=12),
        st.lists(st.binary(max_size=6), min_size=1, max_size=8),
    )
    def test_matches_byte_prefixes_as_zeromq_does(self, changes: list[tuple[bool, bytes]], topics: list[bytes]) -> None:
        """Subscribe and unsubscribe in any order (counted, as XPUB passes them): a topic is wanted
        exactly when one of the prefixes still subscribed starts it, and ``covers`` answers for
        every topic under a prefix only when that answer holds for all of them; ``wants_each`` answers
        as ``wants`` does."""
        subscriptions = Subscriptions()
        held: dict[bytes, int] = {}
        for subscribe, prefix in changes:
            subscriptions.apply(bytes([int(subscribe)]) + prefix)
            held[prefix] = max(0, held.get(prefix, 0) + (1 if subscribe else -1))
        live = [prefix for prefix, count in held.items() if count]
        for topic in topics:
            assert subscriptions.wants(topic) == any(topic.startswith(prefix) for prefix in live)
        assert subscriptions.wants_each(topics).tolist() == [subscriptions.wants(topic) for topic in topics]
        for topic in topics:
            wanted = {subscriptions.wants(topic + tail) for tail in (b"", b"\x00", b"a", b"ab\xff")}
            covers = subscriptions.covers(topic)
            if covers is not None:
                assert wanted == {covers}
            else:
                assert any(prefix.startswith(topic) for prefix in live) and not subscriptions.wants(topic)


class TestThrottle:
    def test_newest_row_wins_and_waits_for_its_interval(self) -> None:
        """emit_interval: a second row inside the interval is held (newest wins) and released when due."""
        throttle = Throttle(1_000, ("mean",))
        first = throttle.admit(SignalResult(np.array([0]), np.array([10]), {"mean": np.array([1.0])}), now_ns=5_000)
        assert first.slots.tolist() == [0]
        held = throttle.admit(SignalResult(np.array([0]), np.array([11]), {"mean": np.array([2.0])}), now_ns=5_100)
        newer = throttle.admit(SignalResult(np.array([0]), np.array([12]), {"mean": np.array([3.0])}), now_ns=5_200)
        assert held.slots.tolist() == newer.slots.tolist() == []
        assert throttle.due(5_900) is None
        due = throttle.due(6_000)
        assert due is not None
        assert (due.slots.tolist(), due.t.tolist(), due.stats["mean"].tolist()) == ([0], [12], [3.0])

    def test_held_rows_of_a_replay_go_out_at_the_next_interval_even_if_sent_before(self) -> None:
        """A replacement worker re-holds replayed rows: its predecessor may have held them unsent."""
        throttle = Throttle(1_000, ("mean",))
        sent = throttle.admit(SignalResult(np.array([0]), np.array([10]), {"mean": np.array([1.0])}), now_ns=5_000)
        assert sent.slots.tolist() == [0]
        throttle.hold(SignalResult(np.array([0, 2, 0]), np.array([10, 20, 11]), {"mean": np.array([1.0, 4.0, 2.0])}))
        assert throttle.due(5_500) is not None  # key 2 was never sent: it is due at once
        due = throttle.due(6_000)
        assert due is not None
        assert (due.slots.tolist(), due.t.tolist(), due.stats["mean"].tolist()) == ([0], [11], [2.0])


class TestFlowControl:
    LATENCY = LatencyConfig(max_batch_delay_ns=1_000_000, max_batch_size=100)

    def test_an_idle_worker_gets_ticks_at_once(self) -> None:
        """Nothing in flight: a single buffered tick leaves immediately, whatever its age."""
        assert send_now(Outbox(ticks=1, oldest_ns=1_000), 0, self.LATENCY, now_ns=1_000)

    def test_a_busy_worker_waits_until_an_ack_or_a_bound(self) -> None:
        """In flight: wait; leave at max_batch_size ticks or max_batch_delay after the oldest tick."""
        young = Outbox(ticks=99, oldest_ns=1_000)
        assert not send_now(young, 500, self.LATENCY, now_ns=1_000 + 999_999)
        assert send_now(young, 500, self.LATENCY, now_ns=1_000 + 1_000_000)
        assert send_now(Outbox(ticks=100, oldest_ns=1_000), 500, self.LATENCY, now_ns=1_000)

    def test_new_keys_go_to_an_idle_worker_and_to_a_busy_one_once_per_patience(self) -> None:
        """The fresh lane: pending keys join a batch for an idle worker, or a busy one that applied the
        last new keys it got; otherwise a busy worker gets the known lane alone, and pending keys
        only once the lane is due again."""
        fresh = Outbox(ticks=1, oldest_ns=1_000, fresh_keys=deque([(0, "N")]), fresh_ticks=1, fresh_due_ns=50_000_000)
        assert fresh_keys_to_send(fresh, 0, self.LATENCY, now_ns=1_000, fresh_applied=False) == 1_000
        assert fresh_keys_to_send(fresh, 500, self.LATENCY, now_ns=2_000, fresh_applied=False) is None
        assert fresh_keys_to_send(fresh, 500, self.LATENCY, now_ns=2_000, fresh_applied=True) == 1_000
        assert fresh_keys_to_send(fresh, 500, self.LATENCY, now_ns=1_001_000, fresh_applied=False) == 0
        assert fresh_keys_to_send(fresh, 500, self.LATENCY, now_ns=50_000_000, fresh_applied=False) == 1_000
        only_fresh = Outbox(fresh_keys=deque([(0, "N")]), fresh_ticks=1, fresh_due_ns=50_000_000)
        assert fresh_keys_to_send(only_fresh, 500, self.LATENCY, now_ns=49_999_999, fresh_applied=False) is None
        assert leaves_by(only_fresh, self.LATENCY) == 50_000_000
        assert leaves_by(fresh, self.LATENCY) == 1_001_000


class TestSupervisorCollector:
    def test_scrape_time_view_becomes_samples(self) -> None:
        """Liveness, restarts, backlog and reloads come from the view at scrape time, labelled by worker."""
        state = {"up": {"0": True, "1": False}, "backlog": {"0": 0, "1": 42}}
        view = SupervisorView(
            processes=list,
            worker_up=lambda: state["up"],
            restarts=lambda: {"0": 0, "1": 3},
            ingest_restarts=lambda: {"0": 1},
            backlog=lambda: state["backlog"],
            reloads=lambda: {"success": 2, "failure": 1},
            version="9.9",
            config_hash=lambda: "abc",
        )
        registry = CollectorRegistry()
        registry.register(SupervisorCollector(view))
        assert registry.get_sample_value("streamd_worker_up", {"worker": "1"}) == 0.0
        assert registry.get_sample_value("streamd_worker_restarts_total", {"worker": "1"}) == 3
        assert registry.get_sample_value("streamd_ingest_restarts_total", {"ingest": "0"}) == 1
        assert registry.get_sample_value("streamd_worker_backlog_ticks", {"worker": "1"}) == 42
        assert registry.get_sample_value("streamd_config_reloads_total", {"result": "failure"}) == 1
        assert registry.get_sample_value("streamd_build_info", {"version": "9.9", "config_hash": "abc"}) == 1
        state["up"]["1"] = True
        assert registry.get_sample_value("streamd_worker_up", {"worker": "1"}) == 1.0
