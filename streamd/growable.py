"""Arrays that grow in place: an anonymous memory mapping that the kernel moves instead of a copy.

A worker's per-key tables and tick pools grow when its key population reaches a new high. Grown
by copying, a table of a few hundred MB costs a pass over all of it and a first touch of every
page of the copy, while every key of that worker waits: 60-300 ms per 100-600 MB on a 2-core
box, up to 900 ms where transparent huge pages had to be compacted first. A mapping grows by
``mremap``, which moves page-table entries: well under a millisecond at any size. Its new pages
read as zero and cost nothing until first written, so memory is touched as keys arrive, a few
rows per batch, not all at once.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS


class GrowableArray:
    """A 1-D array, or an array of rows ``width`` wide, whose first ``length`` items are in use.

    The owner keeps one view (what :meth:`resize` returns) and drops it before the next
    :meth:`resize`: a view kept anywhere else pins the mapping, and the growth falls back to a
    copy (still correct, only as slow as a copy).
    """

    def __init__(self, dtype: DTypeLike, width: int | None = None) -> None:
        self.dtype = np.dtype(dtype)
        self.width = width
        self._item_bytes = self.dtype.itemsize * (width or 1)
        self._map = mmap.mmap(-1, mmap.PAGESIZE, flags=_FLAGS)
        self.length = 0

    def view(self) -> NDArray[Any]:
        """The items in use."""
        flat = np.frombuffer(self._map, self.dtype, count=self.length * (self.width or 1))
        return flat if self.width is None else flat.reshape(self.length, self.width)

    def resize(self, length: int) -> NDArray[Any]:
        """The array with ``length`` items in use; items beyond the old length read as zero.

        The mapping grows geometrically, so appending is amortised O(1) per item, and it never
        shrinks: a smaller table is a fresh :class:`GrowableArray`.
        """
        if length < self.length:
            self._zero(length, self.length)
        needed = length * self._item_bytes
        if needed > len(self._map):
            self._grow_map(max(needed, 2 * len(self._map)))
        self.length = length
        return self.view()

    def nbytes(self) -> int:
        """Bytes of address space held (pages never written take no memory)."""
        return len(self._map)

    def _grow_map(self, size: int) -> None:
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        try:
            self._map.resize(size)
        except (BufferError, OSError, SystemError):
            # A view is still alive elsewhere, or this platform cannot move an anonymous mapping.
            moved = mmap.mmap(-1, size, flags=_FLAGS)
            used = self.length * self._item_bytes
            moved[:used] = self._map[:used]
            self._map = moved

    def _zero(self, start: int, stop: int) -> None:
        width = self.width or 1
        np.frombuffer(self._map, self.dtype, count=stop * width)[start * width :] = 0
