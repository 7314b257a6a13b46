"""GrowableArray: an array in an anonymous mapping that grows in place."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streamd.growable import GrowableArray

lengths = st.lists(st.integers(0, 3_000), min_size=1, max_size=12)


@settings(max_examples=100, deadline=None)
@given(lengths, st.sampled_from([None, 1, 6, 16]), st.randoms(use_true_random=False))
def test_holds_what_was_written_and_new_items_read_zero(steps: list[int], width: int | None, rng) -> None:
    """Grown or shrunk in any order, the array holds what was written below its length, and items
    it gains (again) read as zero, as a fresh NumPy array of zeros would."""
    growable = GrowableArray(np.float64, width)
    shape = (0,) if width is None else (0, width)
    expected = np.zeros(shape)
    array = growable.view()
    for length in steps:
        del array
        array = growable.resize(length)
        kept = expected[: min(length, len(expected))]
        expected = np.zeros((length, *shape[1:]))
        expected[: len(kept)] = kept
        written = rng.randrange(length + 1)
        expected[:written] = array[:written] = rng.random()
        assert array.shape == expected.shape
        np.testing.assert_array_equal(array, expected)


def test_a_view_kept_elsewhere_pins_the_mapping_and_growth_copies() -> None:
    """A view the owner did not drop stays valid with the old contents; the new array has them too."""
    growable = GrowableArray(np.int64, 2)
    array = growable.resize(10)
    array[:] = np.arange(20).reshape(10, 2)
    kept = array[3:5]
    del array
    grown = growable.resize(1_000_000)
    grown[:10] += 100
    np.testing.assert_array_equal(kept, [[6, 7], [8, 9]])
    np.testing.assert_array_equal(grown[:10], np.arange(20).reshape(10, 2) + 100)
    assert not grown[10:].any()


def test_the_mapping_grows_geometrically() -> None:
    """Appending one item at a time resizes the mapping O(log n) times, not once per item."""
    growable = GrowableArray(np.float64)
    sizes = set()
    for length in range(1, 100_000, 97):
        growable.resize(length)
        sizes.add(growable.nbytes())
    assert len(sizes) <= 10
    assert growable.nbytes() < 2 * 8 * 100_000 + 4096
