"""Which rows each training worker reads, in which order: deterministic and resumable.

The shard dataset is a list of Parquet row groups ("units"). For epoch ``e`` the units are permuted with
``(seed, e)`` and the rows of each unit with ``(seed, e, unit)``. Units are dealt round-robin to
``world_size`` lanes, one per worker, so every row is read by exactly one worker (no read amplification
on object storage). Each lane is then shuffled within windows of ``shuffle_buffer`` rows (a bounded
buffer). A global batch of ``B`` is the next ``B / world_size`` rows of every lane.

The data position is ``(epoch, samples consumed)`` plus the segments of that epoch already run, each
``(world_size, batches)``. Replaying the segments reproduces exactly which rows were consumed, so a run
resumed with another number of workers continues the epoch with the remaining rows: none repeated,
none skipped (beyond the per-epoch tail that does not fill a global batch).

With ``order="global"`` the composition of every global batch is independent of the world size instead
(one global stream, worker ``r`` takes slice ``r`` of each batch): runs with 1 and N workers see the
same batches, at the price of workers reading overlapping row groups. Use it for exact comparisons
across world sizes; ``"lanes"`` is the default for large data on object storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Stream = np.ndarray
"""(N, 3) int64 rows of (file index, row group, row index within the row group), in reading order."""


@dataclass
class DataPosition:
    """Where the data stream is: the state saved in checkpoints."""

    epoch: int = 0
    samples: int = 0
    """Global samples consumed in this epoch."""
    segments: list[list[int]] = field(default_factory=list)
    """``[world_size, global batches]`` already run in this epoch, in order."""

    def advance(self, world_size: int, global_batch: int) -> None:
        """Record one consumed global batch by ``world_size`` workers."""
        if self.segments and self.segments[-1][0] == world_size:
            self.segments[-1][1] += 1
        else:
            self.segments.append([world_size, 1])
        self.samples += global_batch

    def next_epoch(self) -> None:
        """Move to the start of the next epoch."""
        self.epoch += 1
        self.samples = 0
        self.segments = []

    def to_dict(self) -> dict:
        """JSON-able form for checkpoints."""
        return {"epoch": self.epoch, "samples": self.samples, "segments": [list(s) for s in self.segments]}

    @classmethod
    def from_dict(cls, d: dict) -> DataPosition:
        """Inverse of :meth:`to_dict`."""
        return cls(int(d["epoch"]), int(d["samples"]), [list(map(int, s)) for s in d["segments"]])


def units_to_stream(units: list[tuple[int, int, np.ndarray]], seed: int, epoch: int) -> Stream:
    """Permute units and the rows inside each unit; concatenate.

    Args:
        units: (file index, row group, valid row indices) for every row group of the dataset.
    """
    rng = np.random.default_rng([seed, epoch])
    parts = []
    for u in rng.permutation(len(units)):
        f, rg, rows = units[u]
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[np.random.default_rng([seed, epoch, int(u)]).permutation(len(rows))]
        part = np.empty((len(rows), 3), dtype=np.int64)
        part[:, 0], part[:, 1], part[:, 2] = f, rg, rows
        parts.append(part)
    return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)


def _chunks(stream: Stream, max_rows: int) -> list[Stream]:
    """Split a stream into runs of rows from the same (file, row group), each of at most ``max_rows``.

    Row groups larger than ``max_rows`` are cut so a small dataset still feeds every worker (a worker
    then reads part of a row group another worker reads too; large datasets keep whole row groups).
    """
    if len(stream) == 0:
        return []
    change = np.flatnonzero(np.any(stream[1:, :2] != stream[:-1, :2], axis=1)) + 1
    out = []
    for run in np.split(stream, change):
        out.extend(run[i : i + max_rows] for i in range(0, len(run), max_rows))
    return out


def _deal(stream: Stream, world_size: int, seed: int, epoch: int, segment: int,
          shuffle_buffer: int) -> list[Stream]:
    """Deal the stream's chunks round-robin to lanes and window-shuffle each lane."""
    chunks = _chunks(stream, max(1, len(stream) // (4 * world_size)))
    lanes = []
    for lane in range(world_size):
        mine = chunks[lane::world_size]
        s = np.concatenate(mine) if mine else np.zeros((0, 3), dtype=np.int64)
        rng = np.random.default_rng([seed, epoch, segment, lane])
        window = max(shuffle_buffer, 1)
        for start in range(0, len(s), window):
            part = s[start : start + window]
            s[start : start + window] = part[rng.permutation(len(part))]
        lanes.append(s)
    return lanes


ORDERS = ("lanes", "global")


def lane_streams(units: list[tuple[int, int, np.ndarray]], seed: int, epoch: int,
                 global_batch: int, world_size: int, segments: list[list[int]],
                 shuffle_buffer: int, order: str = "lanes") -> list[Stream]:
    """The rows left to read in this epoch, per lane, for the current ``world_size``.

    Args:
        units: see :func:`units_to_stream`.
        global_batch: B, divisible by every world size involved.
        segments: the epoch's segments already run (see :class:`DataPosition`).

    Returns:
        ``world_size`` streams; lane ``r`` is what worker ``r`` reads from now on.
    """
    if order not in ORDERS:
        raise ValueError(f"data order must be one of {ORDERS}, got {order!r}")
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} not divisible by world size {world_size}")
    if order == "global":
        stream = _deal(units_to_stream(units, seed, epoch), 1, seed, epoch, 0, shuffle_buffer)[0]
        consumed = sum(w_b[1] for w_b in segments) * global_batch
        n = (len(stream) - consumed) // global_batch
        rest = stream[consumed : consumed + n * global_batch].reshape(n, world_size, -1, 3)
        return [rest[:, r].reshape(-1, 3) for r in range(world_size)]
    remaining = units_to_stream(units, seed, epoch)
    lanes: list[Stream] = []
    for i, (w, batches) in enumerate(segments):
        if global_batch % w:
            raise ValueError(f"global batch {global_batch} not divisible by world size {w}")
        lanes = _deal(remaining, w, seed, epoch, i, shuffle_buffer)
        used = batches * (global_batch // w)
        lanes = [lane[used:] for lane in lanes]
        remaining = np.concatenate(lanes)
    if segments and segments[-1][0] == world_size:
        return lanes  # same world size: every worker continues its lane exactly where it stopped
    return _deal(remaining, world_size, seed, epoch, len(segments), shuffle_buffer)


def batches_left(lanes: list[Stream], global_batch: int) -> int:
    """Global batches every lane can still fill (all workers must take the same number of steps)."""
    per_rank = global_batch // len(lanes)
    return min(len(lane) for lane in lanes) // per_rank if lanes else 0
