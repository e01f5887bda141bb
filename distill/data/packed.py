"""A read-only list kept as one byte buffer, for datasets that forked loader workers read.

A Python list of dicts is millions of small objects; every read in a forked worker writes
their reference counts, so each worker ends up with its own copy of every page it touched
(copy-on-read): LVIS's annotations grow from about 1 GB to several GB per process, times
the workers of every rank. :class:`PackedList` pickles each item into one numpy byte
buffer with an offsets array (detectron2's ``DatasetFromList(serialize=True)``): two
objects, whose pages a worker only reads, and each item is unpickled when asked.

    records = PackedList([{"id": 1, ...}, ...])
    records[0]          # a fresh copy of item 0 (changing it changes nothing stored)
    len(records)
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


class PackedList(Sequence):
    """``items`` pickled into one uint8 buffer; ``[i]`` unpickles item ``i`` (negative
    indices count from the end)."""

    def __init__(self, items: Iterable[Any]):
        blobs = [pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL) for item in items]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> Any:
        n = len(self._ends)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        i %= n
        start = int(self._ends[i - 1]) if i > 0 else 0
        return pickle.loads(self._buffer[start:int(self._ends[i])].tobytes())

    @property
    def nbytes(self) -> int:
        """Bytes held: the buffer and the offsets."""
        return self._buffer.nbytes + self._ends.nbytes
