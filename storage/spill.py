"""A float32 matrix on local disk, written and read by rows: for data larger than memory.

The fit and assign stages need an upstream stage's vectors in item_id order, but the stage
cache holds them in parts of whatever order they were computed in. Reading the cache once and
writing each row at its position into a spill file, then reading slices back with plain reads
(not a memory map, whose touched pages count as the process's memory), lets a stage walk a
catalog of any size with one block of rows in memory at a time.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

BLOCK_ROWS = 65536  # rows read at once by `chunks()` and by one read (64 MB at 256-d)


class SpilledRows:
    """A read-only float32 matrix [N, D] in a temporary file (deleted when closed).

    `len(x)`, `x[a:b]` and `x[row numbers]` read only the rows they return; `subset(rows)` is a
    view of some rows (in the order given) over the same file; `chunks()` walks it in order.
    """

    def __init__(self, n: int, dim: int, folder: str | None = None) -> None:
        self.n, self.dim = n, dim
        self._file = tempfile.TemporaryFile(dir=folder, prefix="sidpipe-spill-")
        self._file.truncate(n * dim * 4)
        self.rows = np.arange(n)
        self.block = BLOCK_ROWS

    # -- writing ---------------------------------------------------------------------------------
    def write(self, positions: np.ndarray, vectors: np.ndarray) -> None:
        """Row positions[i] := vectors[i]."""
        vectors = np.ascontiguousarray(vectors, np.float32).reshape(len(positions), self.dim)
        order = np.argsort(positions, kind="stable")
        positions, vectors = positions[order], vectors[order]
        # Runs of consecutive positions are one write each.
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        for run in np.split(np.arange(len(positions)), breaks):
            if len(run):
                os.pwrite(
                    self._file.fileno(), vectors[run].tobytes(), self._offset(positions[run[0]])
                )

    # -- reading ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: slice | np.ndarray | list[int]) -> np.ndarray:
        positions = self.rows[key]
        if positions.ndim != 1:
            raise IndexError("SpilledRows takes a slice or a list of row numbers")
        out = np.empty((len(positions), self.dim), np.float32)
        if not len(positions):
            return out
        order = np.argsort(positions, kind="stable")
        ordered = positions[order]
        # Read each stretch of rows at most `block` long that the wanted rows fall in, once.
        first = 0
        while first < len(ordered):
            start = ordered[first]
            last = int(np.searchsorted(ordered, start + self.block, side="left"))
            stop = int(ordered[last - 1]) + 1
            size = (stop - start) * self.dim * 4
            data = os.pread(self._file.fileno(), size, self._offset(start))
            block = np.frombuffer(data, np.float32).reshape(stop - start, self.dim)
            out[order[first:last]] = block[ordered[first:last] - start]
            first = last
        return out

    def subset(self, rows: np.ndarray | list[int]) -> SpilledRows:
        view = object.__new__(SpilledRows)
        view.__dict__ = {**self.__dict__, "rows": self.rows[np.asarray(rows, np.int64)]}
        return view

    def chunks(self):
        """The rows in order, `block` at a time."""
        for start in range(0, len(self), self.block):
            yield self[start : start + self.block]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SpilledRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _offset(self, row: int) -> int:
        return int(row) * self.dim * 4
