"""The worker's ownership view, the in-band ownership messages and the takeover horizon, without sockets."""

from __future__ import annotations

import numpy as np

from streamd.clusterfeed import EWMA_HALF_LIVES, replay_horizon_ns
from streamd.config import ClusterConfig, Config, SignalSpec
from streamd.fencing import PartitionView
from streamd.partitions import partition_for
from streamd.records import decode_record, encode_batch_record
from streamd.transport import (
    PartitionDropped,
    PartitionOwned,
    decode,
    encode_partition_dropped,
    encode_partition_owned,
)
from streamd.windows import SignalResult

KEYS = ["AAPL", "MSFT", "GOOG", "IBM", 42, "X"]


def view_with_keys(partitions: int = 4) -> PartitionView:
    view = PartitionView(partitions)
    view.learn(np.arange(3), KEYS[:3])
    view.learn(np.arange(3, len(KEYS)), KEYS[3:])
    return view


def result_for(slots: list[int]) -> SignalResult:
    rows = np.array(slots, np.int64)
    return SignalResult(rows, rows * 10, {"mean": rows.astype(float) + 0.5})


def test_keys_get_the_partition_the_ingest_gives_them() -> None:
    """Local key i is in partition_for(key), learnt in the worker's key order."""
    view = view_with_keys()
    assert view.key_partition[: len(KEYS)].tolist() == [partition_for(key, 4) for key in KEYS]


def test_a_reused_local_index_takes_its_new_key_s_partition() -> None:
    """After an eviction the worker hands the index to another key: the view follows."""
    view = view_with_keys()
    other = next(k for k in (f"K{i}" for i in range(100)) if partition_for(k, 4) != partition_for(KEYS[0], 4))
    view.learn(np.array([0]), [other])
    assert view.key_partition[0] == partition_for(other, 4)


def test_only_live_partitions_are_published_with_their_token() -> None:
    """Rows of a replaying or foreign partition are withheld; live rows carry part and fence."""
    view = view_with_keys()
    parts = view.key_partition
    live, replaying = int(parts[0]), next(int(p) for p in parts if p != parts[0])
    view.own(live, 7, live=True)
    view.own(replaying, 9, live=False)
    shown = view.visible(result_for(list(range(len(KEYS)))))
    assert shown.slots.tolist() == np.flatnonzero(parts == live).tolist()
    assert set(shown.stats["part"].tolist()) == {live}
    assert set(shown.stats["fence"].tolist()) == {7}
    assert shown.stats["mean"].tolist() == (shown.slots + 0.5).tolist()


def test_a_new_term_or_a_loss_names_the_keys_to_forget() -> None:
    """Same token again: keep the windows; another token or a drop: evict that partition's keys."""
    view = view_with_keys()
    partition = int(view.key_partition[0])
    mine = np.flatnonzero(view.key_partition == partition).tolist()
    view.own(partition, 5, live=False)
    assert not len(view.own(partition, 5, live=True))
    assert view.own(partition, 6, live=False).tolist() == mine
    assert view.drop(partition).tolist() == mine
    assert not len(view.visible(result_for(mine)).slots)


def test_ownership_messages_round_trip() -> None:
    """PartitionOwned and PartitionDropped travel in-band as one msgpack frame each."""
    owned = PartitionOwned(3, 12345, live=True)
    assert decode(encode_partition_owned(owned)) == owned
    assert decode(encode_partition_dropped(7)) == PartitionDropped(7)


def test_part_and_fence_are_integers_on_the_wire() -> None:
    """A record's part and fence (float columns inside) are sent as msgpack integers."""
    frames = encode_batch_record("s", ["A"], np.array([1]), {"part": np.array([3.0]), "fence": np.array([99.0])}, 0)
    record = decode_record(frames)
    assert (record["part"], record["fence"]) == ([3], [99])
    assert all(isinstance(v, int) for v in (*record["part"], *record["fence"]))


def test_replay_horizon_covers_the_longest_window() -> None:
    """Longest time window, 20 ewma half-lives, or the configured floor (what count windows rely on)."""
    cluster = ClusterConfig(servers=("nats://h:4222",), replay_horizon_ns=60 * 10**9)
    signals = (SignalSpec("t", "time", 5 * 10**9, ("mean",)), SignalSpec("c", "count", 100, ("mean",)))
    assert replay_horizon_ns(Config(signals=signals, cluster=cluster)) == 60 * 10**9
    slow = (*signals, SignalSpec("e", "ewma", 10 * 10**9, ("ewma",)))
    assert replay_horizon_ns(Config(signals=slow, cluster=cluster)) == EWMA_HALF_LIVES * 10 * 10**9
