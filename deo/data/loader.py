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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from deo.bands import S2_TRUE_COLOUR_MAX
from deo.data.sampling import Stream
from deo.io import storage
from deo.io.shards import tensor_column_to_numpy

COLUMNS = ("sample_id", "ms", "optical", "ms_gsd", "optical_gsd")


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


def check_shard_files(files: list[str], with_sar: bool = False, threads: int = 16) -> None:
    """Read every shard's Parquet footer (a few in parallel) and check the columns training reads.

    Run by the driver, so a damaged or foreign shard stops the run before any worker starts.

    Raises:
        ValueError: naming the first bad file: missing, not Parquet (e.g. cut short), or without a
            column training needs.
    """
    need = [c for c in COLUMNS if c != "optical"] + ["source_ms"]

    def check(f: str) -> None:
        try:
            fs, path = storage.pyarrow_filesystem(f)
            names = pq.ParquetFile(path, filesystem=fs).schema_arrow.names
        except FileNotFoundError as e:
            raise ValueError(f"shard {f} is listed in manifest.json but missing") from e
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"shard {f} is not a readable Parquet file ({type(e).__name__}: {e})") from e
        missing = [c for c in need if c not in names]
        if missing:
            raise ValueError(f"shard {f} has no {', '.join(missing)} column (see the shard schema in the "
                             "README; re-ingest it with pipelines/ingest.py)")
        if with_sar and "sar" not in names:
            raise ValueError(f"model.sar needs a `sar` column; shard {f} has none (ingest with a SAR source)")

    with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
        for _ in pool.map(check, files):
            pass


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
            try:
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
            except Exception as e:  # noqa: BLE001 - re-raised naming the file
                raise ValueError(f"shard {f}: {e}") from e
        if ms_shape is None:
            raise ValueError(f"no Parquet shards found in {uri}")
        return cls(uri, files, units, ms_shape, opt_shape, sar_shape)

    @property
    def num_rows(self) -> int:
        """Trainable rows (rows with an ``ms`` tile)."""
        return sum(len(u[2]) for u in self.units)


OPEN_FILES_PER_THREAD = 4


class _RowGroupCache:
    """Decoded row groups, each decoded once per lane and freed after the lane's last row from it.

    A shuffle window of W rows mixes about W / 64 row groups; holding each until its last row is read
    means a row group is decoded once, not once per batch that touches it, and memory stays about one
    shuffle window of decoded rows (``train.shuffle_buffer`` x row size). With ``threads`` > 1 the next
    row groups, in the order the lane first needs them, decode concurrently (Parquet decoding and the
    copies release the GIL): one thread decodes about 130 rows of 256 px per second on a 2-core VM,
    fewer than one H100 consumes (bench/RESULTS.md).
    """

    def __init__(self, index: ShardIndex, lane: Stream, threads: int = 1) -> None:
        """``lane``: the (file, row group, row) rows this loader will read, in order."""
        self.index = index
        keys = lane[:, 0] * (1 << 32) + lane[:, 1]
        # position of the last read of each row group (np.unique on the reversed lane gives first hits)
        uniq, first_from_end = np.unique(keys[::-1], return_index=True)
        self.last_read = dict(zip(uniq.tolist(), (len(keys) - 1 - first_from_end).tolist(), strict=True))
        _, first = np.unique(keys, return_index=True)
        self.first_use = [(int(k >> 32), int(k & 0xFFFFFFFF)) for k in keys[np.sort(first)]]
        self.rank = {key: i for i, key in enumerate(self.first_use)}
        self.cache: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self.decoded = 0
        """Row groups decoded so far (tests, benchmarks)."""
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads, "deo-decode") if self.threads > 1 else None
        self.pending: dict[tuple[int, int], Future] = {}
        self.submitted = 0
        self.local = threading.local()  # a ParquetFile per thread: readers are not shared across threads

    def release(self, f: int, rg: int, position: int) -> None:
        """Forget row group (f, rg) if ``position`` was the lane's last read of it."""
        if self.last_read.get(f * (1 << 32) + rg) == position:
            self.cache.pop((f, rg), None)

    def close(self) -> None:
        """Stop decoding ahead (an abandoned pass)."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def get(self, f: int, rg: int) -> dict[str, np.ndarray]:
        """The decoded row group (f, rg), decoding it (and, threaded, the next ones) if needed."""
        key = (f, rg)
        if key in self.cache:
            return self.cache[key]
        if self.pool is None:
            decoded = self._decode(f, rg)
        else:
            # keep `threads` row groups decoding beyond this one, in first-use order
            until = min(len(self.first_use), self.rank[key] + 1 + self.threads)
            while self.submitted < until:
                nxt = self.first_use[self.submitted]
                self.pending[nxt] = self.pool.submit(self._decode, *nxt)
                self.submitted += 1
            decoded = self.pending.pop(key).result()
        self.cache[key] = decoded
        self.decoded += 1
        return decoded

    def _decode(self, f: int, rg: int) -> dict[str, np.ndarray]:
        try:
            return self._decode_row_group(f, rg)
        except Exception as e:  # noqa: BLE001 - re-raised naming the file
            raise RuntimeError(f"shard {self.index.files[f]}, row group {rg}: {type(e).__name__}: {e}") from e

    def _decode_row_group(self, f: int, rg: int) -> dict[str, np.ndarray]:
        # a few open files per thread (each holds a handle and, on object storage, a read buffer)
        files: OrderedDict[int, pq.ParquetFile] = self.local.__dict__.setdefault("files", OrderedDict())
        if f in files:
            files.move_to_end(f)
        else:
            fs, path = storage.pyarrow_filesystem(self.index.files[f])
            files[f] = pq.ParquetFile(path, filesystem=fs)
            if len(files) > OPEN_FILES_PER_THREAD:
                files.popitem(last=False)[1].close()
        sar = self.index.sar_shape is not None
        t = files[f].read_row_group(rg, columns=[*COLUMNS, "sar"] if sar else list(COLUMNS))
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
                 prefetch: int = 4, pin_memory: bool = False, decode_threads: int = 1) -> None:
        if len(lane) < batch_size * num_batches:
            raise ValueError(f"lane has {len(lane)} rows, fewer than {num_batches} x {batch_size}")
        self.index, self.lane = index, lane
        self.batch_size, self.num_batches = batch_size, num_batches
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self.decode_threads = decode_threads
        self.wait_seconds = 0.0
        """Total time the consumer blocked waiting for a batch."""
        self.row_groups: _RowGroupCache | None = None
        """The decoded row groups of the current pass (``.decoded`` counts decodes)."""

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        lane = self.lane[: self.batch_size * self.num_batches]
        cache = self.row_groups = _RowGroupCache(self.index, lane, self.decode_threads)
        try:
            for b in range(self.num_batches):
                start = b * self.batch_size
                parts: dict[str, list[np.ndarray]] = {}
                for i, (f, rg, r) in enumerate(lane[start : start + self.batch_size].tolist()):
                    d = cache.get(f, rg)
                    for k, v in d.items():
                        parts.setdefault(k, []).append(v[r])
                    cache.release(f, rg, start + i)
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
        finally:
            cache.close()

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
