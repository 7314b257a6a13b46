"""A worker's view of cluster ownership: which rows it may publish, stamped with which fencing token.

In cluster mode the cluster process tells every worker, in-band on the batch wire, which
partitions this instance owns (``PartitionOwned``), whether each is still replaying, and when
one is gone (``PartitionDropped``). :class:`PartitionView` turns that into per-row decisions
for the engine's results, vectorised over the rows:

- rows of a partition that is replaying are computed (that is what rebuilds the windows) but
  not published, so the first published record equals an uninterrupted computation;
- published rows gain ``part`` (the key's partition) and ``fence`` (the token of the
  ownership term), which a consumer uses to discard output of a deposed owner;
- a new ownership term of a partition, or its loss, names the local keys whose state must go.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from streamd.partitions import partitions_for
from streamd.windows import SignalResult

FENCE_FIELDS = ("part", "fence")


class PartitionView:
    """Per local key its partition; per partition its token and whether it is live (published)."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.key_partition = np.zeros(0, np.int64)
        self.token = np.zeros(partitions, np.int64)
        self.live = np.zeros(partitions, bool)

    def learn(self, indices: np.ndarray, keys: Sequence[str | int]) -> None:
        """Keys that got these local indices (new, or reused after an eviction): note their partitions."""
        if not len(keys):
            return
        top = int(indices.max()) + 1
        if top > len(self.key_partition):
            grown = np.full(max(top, 2 * len(self.key_partition)), -1, self.key_partition.dtype)
            grown[: len(self.key_partition)] = self.key_partition
            self.key_partition = grown
        self.key_partition[indices] = partitions_for(keys, self.partitions)

    def own(self, partition: int, token: int, *, live: bool) -> np.ndarray:
        """Enter or continue an ownership term; the local keys to evict when it is a new term."""
        stale = self.keys_of(partition) if token != self.token[partition] else np.zeros(0, np.int64)
        self.token[partition] = token
        self.live[partition] = live
        return stale

    def drop(self, partition: int) -> np.ndarray:
        """The partition is no longer ours: stop publishing it; the local keys to evict."""
        self.token[partition] = 0
        self.live[partition] = False
        return self.keys_of(partition)

    def keys_of(self, partition: int) -> np.ndarray:
        return np.flatnonzero(self.key_partition == partition)

    def visible(self, result: SignalResult) -> SignalResult:
        """The rows of live partitions, with ``part`` and ``fence`` columns added."""
        parts = self.key_partition[result.slots]
        keep = self.live[parts]
        parts = parts[keep]
        stats = {name: column[keep] for name, column in result.stats.items()}
        stats["part"] = parts.astype(np.float64)
        stats["fence"] = self.token[parts].astype(np.float64)
        return SignalResult(result.slots[keep], result.t[keep], stats)
