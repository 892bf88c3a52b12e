"""Stream a worker's share of the Parquet shards as batches of raw tiles, prefetched in a thread.

Only the rows of the worker's lane (see :mod:`deo.data.sampling`) are read, one row group at a time,
through a small cache; decoding is a zero-copy view of the tensor columns. A background thread keeps a
bounded queue of ready batches so reading overlaps compute; the time the trainer blocks on that queue
is the data-wait it reports. Tiles stay uint16/uint8 here: cropping, flips and normalisation happen
batched on the training device (:mod:`deo.data.multicrop`), so the host ships 2-byte pixels.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from deo.data.sampling import Stream
from deo.io import storage
from deo.io.shards import tensor_column_to_numpy

COLUMNS = ("sample_id", "ms", "optical", "ms_gsd", "optical_gsd")


S2_TRUE_COLOUR_MAX = 3000
"""Reflectance x 10000 mapped to 255 in the S2 true colour (ingest's ``s2_optical_max`` default)."""


def fill_true_colour(ms: torch.Tensor, optical: torch.Tensor, has_optical: torch.Tensor,
                     max_value: float = S2_TRUE_COLOUR_MAX) -> torch.Tensor:
    """Optical tiles, with the S2 true colour (B04 B03 B02) of the MS tile where a row has none.

    Args:
        ms: (B, 10, S, S) uint16 in DEO band order.
        optical: (B, 3, A, A) uint8 (zeros where missing).
        has_optical: (B,) bool.

    Returns:
        (B, 3, A, A) uint8, as ingest's ``s2_optical`` would have written it.
    """
    # no early exit on has_optical.all(): reading it back would sync the GPU every step
    # B04 B03 B02 = channels 2, 1, 0; slice then flip (CUDA has no uint16 indexing kernels)
    rgb = ms[:, 0:3].float().flip(1) * (255.0 / max_value)
    if rgb.shape[-1] != optical.shape[-1]:
        rgb = torch.nn.functional.interpolate(rgb, size=optical.shape[-2:], mode="bilinear",
                                              align_corners=False)
    rgb = rgb.round().clamp(0, 255).to(torch.uint8)
    return torch.where(has_optical.view(-1, 1, 1, 1), optical, rgb)


@dataclass
class ShardIndex:
    """The files of a shard dataset and the rows with an ``ms`` tile in each row group."""

    uri: str
    files: list[str]
    units: list[tuple[int, int, np.ndarray]]
    ms_shape: tuple[int, ...]
    optical_shape: tuple[int, ...] | None
    sar_shape: tuple[int, ...] | None = None
    """Shape of the ``sar`` column when built ``with_sar`` (its batches then carry ``sar``)."""

    @classmethod
    def build(cls, uri: str, files: list[str], with_sar: bool = False) -> ShardIndex:
        """Read Parquet footers and the small ``source_ms`` column to find trainable rows.

        ``with_sar`` (``model.sar``) keeps only rows that also have a ``sar`` tile; finding them reads
        the ``sar`` column once.
        """
        units: list[tuple[int, int, np.ndarray]] = []
        ms_shape: tuple[int, ...] | None = None
        opt_shape: tuple[int, ...] | None = None
        sar_shape: tuple[int, ...] | None = None
        for fi, f in enumerate(files):
            fs, path = storage.pyarrow_filesystem(f)
            pf = pq.ParquetFile(path, filesystem=fs)
            if ms_shape is None:
                schema = pf.schema_arrow
                ms_shape = tuple(schema.field("ms").type.shape)
                if "optical" in schema.names:
                    opt_shape = tuple(schema.field("optical").type.shape)
                if with_sar:
                    if "sar" not in schema.names:
                        raise ValueError(f"model.sar needs a `sar` column; the shards in {uri} have none "
                                         "(ingest with a SAR source)")
                    sar_shape = tuple(schema.field("sar").type.shape)
            for rg in range(pf.num_row_groups):
                t = pf.read_row_group(rg, columns=["source_ms", "sar"] if with_sar else ["source_ms"])
                ok = t.column("source_ms").is_valid().to_numpy(zero_copy_only=False)
                if with_sar:
                    ok = ok & t.column("sar").is_valid().to_numpy(zero_copy_only=False)
                valid = np.flatnonzero(ok)
                if len(valid):
                    units.append((fi, rg, valid))
        if ms_shape is None:
            raise ValueError(f"no Parquet shards found in {uri}")
        return cls(uri, files, units, ms_shape, opt_shape, sar_shape)

    @property
    def num_rows(self) -> int:
        """Trainable rows (rows with an ``ms`` tile)."""
        return sum(len(u[2]) for u in self.units)


class _RowGroupCache:
    """The last few decoded row groups (a lane window spans only a few)."""

    def __init__(self, index: ShardIndex, size: int = 8) -> None:
        self.index = index
        self.size = size
        self.cache: OrderedDict[tuple[int, int], dict[str, np.ndarray]] = OrderedDict()
        self.files: dict[int, pq.ParquetFile] = {}

    def get(self, f: int, rg: int) -> dict[str, np.ndarray]:
        key = (f, rg)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        if f not in self.files:
            fs, path = storage.pyarrow_filesystem(self.index.files[f])
            self.files[f] = pq.ParquetFile(path, filesystem=fs)
        sar = self.index.sar_shape is not None
        t = self.files[f].read_row_group(rg, columns=[*COLUMNS, "sar"] if sar else list(COLUMNS))
        n = t.num_rows
        ms, _ = tensor_column_to_numpy(t.column("ms"))
        if self.index.optical_shape is not None:
            opt, has_opt = tensor_column_to_numpy(t.column("optical"))
        else:
            opt, has_opt = np.zeros((n, 3, *self.index.ms_shape[1:]), np.uint8), np.zeros(n, bool)
        ids = t.column("sample_id").to_pylist()
        decoded = {
            "ms": ms,
            "optical": opt,
            "has_optical": has_opt,
            "ms_gsd": t.column("ms_gsd").to_numpy().astype(np.float32),
            "optical_gsd": t.column("optical_gsd").fill_null(0).to_numpy().astype(np.float32),
            "sample_id": np.array(ids, dtype=object),
        }
        if sar:
            decoded["sar"] = tensor_column_to_numpy(t.column("sar"))[0]
        self.cache[key] = decoded
        if len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return decoded


class ShardLoader:
    """Iterate ``num_batches`` batches of ``batch_size`` rows of one lane, prefetched in a thread.

    Yields:
        dict with ``ms`` uint16 (b, 10, S, S), ``optical`` uint8 (b, 3, A, A), ``has_optical`` bool (b,),
        ``ms_gsd``/``optical_gsd`` float32 (b,), ``sar`` float32 (b, 2, S, S) when the index was built
        ``with_sar``, as torch tensors (pinned when ``pin_memory``), and
        ``sample_id`` (a list of b strings).
    """

    def __init__(self, index: ShardIndex, lane: Stream, batch_size: int, num_batches: int,
                 prefetch: int = 4, pin_memory: bool = False) -> None:
        if len(lane) < batch_size * num_batches:
            raise ValueError(f"lane has {len(lane)} rows, fewer than {num_batches} x {batch_size}")
        self.index, self.lane = index, lane
        self.batch_size, self.num_batches = batch_size, num_batches
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self.wait_seconds = 0.0
        """Total time the consumer blocked waiting for a batch."""

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        cache = _RowGroupCache(self.index)
        try:
            for b in range(self.num_batches):
                rows = self.lane[b * self.batch_size : (b + 1) * self.batch_size]
                parts: dict[str, list[np.ndarray]] = {}
                for f, rg, r in rows:
                    d = cache.get(int(f), int(rg))
                    for k, v in d.items():
                        parts.setdefault(k, []).append(v[r])
                ids = [str(x) for x in parts.pop("sample_id")]
                batch: dict[str, Any] = {k: torch.from_numpy(np.stack(v)) for k, v in parts.items()}
                if self.pin_memory:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                batch["sample_id"] = ids
                while not stop.is_set():
                    try:
                        out.put(batch, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(None)
        except BaseException as e:  # surface reader errors in the training thread
            out.put(e)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(q, stop), daemon=True)
        thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                self.wait_seconds += time.perf_counter() - t0
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise RuntimeError(f"reading shards of {self.index.uri} failed: {item}") from item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)
