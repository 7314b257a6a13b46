"""The worker's drain order: known keys' batches go first, each ingest's batches stay in order."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from streamd.transport import WorkerBatch
from streamd.worker import known_first

drains = st.lists(st.tuples(st.integers(0, 2), st.booleans(), st.booleans()), max_size=30)


def batch(seq: int, ingest: int, announces: bool, releases: bool) -> WorkerBatch:
    t = np.array([seq], np.int64)
    new_keys: list[tuple[int, str | int]] = [(seq, f"K{seq}")] if announces else []
    return WorkerBatch(t, t, np.ones(1), np.ones(1), new_keys, 0, ingest, 0, 1, seq, [seq] if releases else [])


@given(drains)
def test_known_batches_go_first_as_far_as_each_ingests_order_allows(drain: list[tuple[int, bool, bool]]) -> None:
    """Every batch once; known holds no announcement or release; per ingest, known is a prefix of its
    batches, ended by its first batch that announces or releases keys."""
    batches = [batch(seq, *shape) for seq, shape in enumerate(drain)]
    known, rest = known_first(batches)
    assert sorted(b.seq_start for b in known + rest) == list(range(len(batches)))
    assert not any(b.new_keys or b.gone for b in known)
    for ingest in range(3):
        own = [b.seq_start for b in batches if b.ingest == ingest]
        first_flood = next((b.seq_start for b in batches if b.ingest == ingest and (b.new_keys or b.gone)), None)
        cut = len(own) if first_flood is None else own.index(first_flood)
        assert [b.seq_start for b in known if b.ingest == ingest] == own[:cut]
        assert [b.seq_start for b in rest if b.ingest == ingest] == own[cut:]
