"""PositionBook: a partition's position is committed only once every worker applied what was handed before it."""

from __future__ import annotations

import pytest

from streamd.positions import Position, PositionBook


class Counts:
    """Stand-in for the ledger's per-worker handed and applied counts of one ingest."""

    def __init__(self, workers: int) -> None:
        self.handed = [0] * workers
        self.applied = [0] * workers


@pytest.fixture
def counts() -> Counts:
    return Counts(2)


@pytest.fixture
def book(counts: Counts) -> PositionBook:
    return PositionBook(handed=lambda: counts.handed, applied=lambda: counts.applied)


@pytest.mark.timeout(5)
def test_a_position_commits_only_after_every_worker_applied_what_was_handed_before_it(
    book: PositionBook, counts: Counts
) -> None:
    book.handed_over(3, Position(10, 1000))
    counts.handed = [5, 7]
    assert book.advance(flushed=True) == {}  # the candidate is taken now
    book.handed_over(3, Position(11, 1100))  # later than the candidate: not part of it
    counts.applied = [5, 6]
    assert book.advance(flushed=True) == {}  # worker 1 is one tick short
    counts.applied = [5, 7]
    assert book.advance(flushed=True) == {3: Position(10, 1000)}
    counts.applied = [5, 7]  # nothing handed since the second candidate, so it is applied already
    assert book.advance(flushed=True) == {3: Position(11, 1100)}


@pytest.mark.timeout(5)
def test_no_candidate_while_outboxes_hold_ticks_and_a_forgotten_partition_never_commits(
    book: PositionBook, counts: Counts
) -> None:
    book.handed_over(1, Position(4, 40))
    book.handed_over(2, Position(9, 90))
    assert book.advance(flushed=False) == {}
    assert book.advance(flushed=False) == {}  # still no candidate: nothing can commit
    assert book.advance(flushed=True) == {}
    book.forget(2)
    assert book.advance(flushed=True) == {1: Position(4, 40)}


@pytest.mark.timeout(5)
def test_a_worker_reset_drops_the_candidate_and_settled_needs_everything_applied(
    book: PositionBook, counts: Counts
) -> None:
    book.handed_over(0, Position(2, 20))
    counts.handed = [3, 3]
    book.advance(flushed=True)
    book.reset()
    counts.applied = [3, 3]
    assert book.advance(flushed=False) == {}  # the candidate went with the reset
    counts.handed = [4, 3]
    assert book.settled() == {}
    counts.applied = [4, 3]
    assert book.settled() == {0: Position(2, 20)}
