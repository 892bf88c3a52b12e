"""Parquet shards (schema_version 1, DESIGN.md "Shard contract"): schema, writer and reader.

One row per tile. ``ms`` is a ``fixed_shape_tensor`` uint16 ``[10, S, S]`` holding reflectance x 10000
after offset removal, clipped to >= 1, with 0 = nodata; ``optical`` is a ``fixed_shape_tensor`` uint8
``[3, A, A]``; either may be null. The reader is plain pyarrow (no Ray), so it runs on machines without
Ray and reads local folders and ``s3://`` alike.

Example:
    >>> ds = ShardDataset.open("runs/shards/samples")
    >>> ds.check_bands(DEO_BANDS)
    >>> for batch in ds.iter_batches(batch_size=32):
    ...     batch["ms"].shape  # (N, 10, S, S) uint16
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deo.bands import DEO_BANDS, RGB_BANDS, SAR_BANDS
from deo.io import storage

SCHEMA_VERSION = 1
"""Version of the shard contract written and accepted here."""

MANIFEST = "manifest.json"
"""File name of the manifest beside the shards."""

MS_NODATA = 0
"""Value of ``ms`` pixels without data (valid pixels are clipped to >= 1)."""


def ms_type(size: int) -> pa.DataType:
    """``fixed_shape_tensor`` uint16 [10, size, size]."""
    return pa.fixed_shape_tensor(pa.uint16(), [len(DEO_BANDS), size, size])


def optical_type(size: int) -> pa.DataType:
    """``fixed_shape_tensor`` uint8 [3, size, size]."""
    return pa.fixed_shape_tensor(pa.uint8(), [len(RGB_BANDS), size, size])


def sar_type(size: int) -> pa.DataType:
    """``fixed_shape_tensor`` float32 [2, size, size]: Sentinel-1 VV, VH backscatter in dB on the ms grid."""
    return pa.fixed_shape_tensor(pa.float32(), [len(SAR_BANDS), size, size])


def shard_schema(ms_px: int, optical_px: int, sar: bool = False) -> pa.Schema:
    """The Parquet schema of one ingest run, with band names, sizes and version in its metadata.

    ``sar=True`` adds the nullable ``sar`` column (float32 [2, ms_px, ms_px], VV and VH in dB) for runs
    that ingest a SAR source.
    """
    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("ms", ms_type(ms_px), nullable=True),
        pa.field("optical", optical_type(optical_px), nullable=True),
        pa.field("ms_gsd", pa.float32()),
        pa.field("optical_gsd", pa.float32()),
        pa.field("crs", pa.string()),
        pa.field("bounds", pa.list_(pa.float64(), 4)),
        pa.field("lon", pa.float64()),
        pa.field("lat", pa.float64()),
        pa.field("time", pa.timestamp("us", tz="UTC"), nullable=True),
        pa.field("source_ms", pa.string(), nullable=True),
        pa.field("source_optical", pa.string(), nullable=True),
    ]
    if sar:
        fields.insert(3, pa.field("sar", sar_type(ms_px), nullable=True))
    meta = {
        "deo.schema_version": str(SCHEMA_VERSION),
        "deo.ms_bands": ",".join(DEO_BANDS),
        "deo.optical_bands": ",".join(RGB_BANDS),
        "deo.ms_px": str(ms_px),
        "deo.optical_px": str(optical_px),
        "deo.ms_units": "reflectance x 10000 after baseline offset removal, clipped >= 1",
        "deo.ms_nodata": str(MS_NODATA),
    }
    if sar:
        meta["deo.sar_bands"] = ",".join(SAR_BANDS)
        meta["deo.sar_units"] = "backscatter sigma0 in dB"
    return pa.schema(fields, metadata=meta)


def _tensor_array(
    arrays: Sequence[np.ndarray | None], tensor_type: pa.DataType, dtype: np.dtype
) -> pa.ExtensionArray:
    """A nullable fixed_shape_tensor array (None -> null row) from per-row numpy tensors."""
    shape = tuple(tensor_type.shape)
    size = int(np.prod(shape))
    flat = np.zeros((len(arrays), size), dtype=dtype)
    valid = np.zeros(len(arrays), dtype=bool)
    for i, a in enumerate(arrays):
        if a is not None:
            if a.shape != shape:
                raise ValueError(f"tensor of shape {a.shape}, expected {shape}")
            flat[i] = a.reshape(-1)
            valid[i] = True
    storage_arr = pa.FixedSizeListArray.from_arrays(
        pa.array(flat.reshape(-1)), size, mask=pa.array(~valid)
    )
    return pa.ExtensionArray.from_storage(tensor_type, storage_arr)


def rows_to_table(rows: Sequence[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a table of the shard schema from row dicts (``ms``/``optical``/``sar`` numpy or None)."""
    cols: dict[str, pa.Array] = {}
    for f in schema:
        values = [r.get(f.name) for r in rows]
        if f.name == "ms":
            cols[f.name] = _tensor_array(values, f.type, np.dtype(np.uint16))
        elif f.name == "optical":
            cols[f.name] = _tensor_array(values, f.type, np.dtype(np.uint8))
        elif f.name == "sar":
            cols[f.name] = _tensor_array(values, f.type, np.dtype(np.float32))
        else:
            cols[f.name] = pa.array(values, type=f.type)
    return pa.Table.from_pydict(cols, schema=schema)


ROW_GROUP_ROWS = 64
"""Rows per Parquet row group (64 x 1 MB at 224 px: a worker's read unit and cache entry)."""


def write_table(uri: str, table: pa.Table) -> None:
    """Write one shard file atomically (temp name + rename locally; one PUT on object stores)."""
    sink = pa.BufferOutputStream()
    # small row groups: the unit a training worker reads (bounded memory per worker, finer lanes)
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def manifest_gsd(manifest: dict[str, Any]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Metres per pixel of the tiles training reads (rows with ``ms``), from a manifest's sources.

    Returns:
        ``({modality: median}, {modality: [min, max]})`` over the MS tiles of the ok and partial S2
        sources (the median weighted by tile count) for ``ms`` and their optical tiles (the same extent
        at ``tile.optical_px``) for ``optical``; both empty when the manifest records no S2 GSD.
    """
    tiles = sorted((float(s["gsd"]), int(s.get("tiles") or 0)) for s in manifest.get("sources", [])
                   if s.get("kind", "").startswith("s2") and s.get("status") in ("ok", "partial")
                   and s.get("gsd") and s.get("tiles"))
    if not tiles:
        return {}, {}
    half, seen = sum(n for _, n in tiles) / 2, 0
    median = next(g for g, n in tiles if (seen := seen + n) >= half)
    size = manifest.get("tile", {})
    ratio = size.get("ms_px", 1) / size.get("optical_px", size.get("ms_px", 1))
    gsd = {"ms": median, "optical": median * ratio}
    return gsd, {"ms": [tiles[0][0], tiles[-1][0]], "optical": [tiles[0][0] * ratio, tiles[-1][0] * ratio]}


@dataclass
class ShardDataset:
    """An ingested shard folder: its manifest and Parquet files (local path or URI)."""

    uri: str
    manifest: dict[str, Any]
    files: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, uri: str) -> ShardDataset:
        """Read ``<uri>/manifest.json`` and list the shard files.

        Raises:
            FileNotFoundError: no manifest at ``uri``.
            ValueError: the manifest's schema_version is not :data:`SCHEMA_VERSION`.
        """
        uri = uri.rstrip("/")
        path = storage.join(uri, MANIFEST)
        if not storage.exists(path):
            raise FileNotFoundError(f"no {MANIFEST} in {uri}: run pipelines/ingest.py output={uri}")
        manifest = json.loads(storage.read_text(path))
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"{path}: schema_version {version!r}, expected {SCHEMA_VERSION}; re-ingest the data "
                "with this version of deo"
            )
        names = manifest.get("files")
        if names:
            files = [storage.join(uri, n) for n in names]
        else:
            files = storage.list_files(uri, ".parquet", recursive=False)
        return cls(uri=uri, manifest=manifest, files=files)

    @property
    def bands(self) -> tuple[str, ...]:
        """The ``ms`` band names, in stored order."""
        return tuple(self.manifest["bands"]["ms"])

    @property
    def stats(self) -> dict[str, dict[str, list[float]]]:
        """Per-band mean and std over valid pixels in stored units: {"ms": {...}, "optical": {...}}."""
        return dict(self.manifest["stats"])

    def __len__(self) -> int:
        """Number of rows (tiles)."""
        return int(self.manifest["counts"]["rows"])

    def check_bands(self, expected: tuple[str, ...] | Sequence[str]) -> None:
        """Raise unless the shard's ``ms`` bands are ``expected``, in order.

        Raises:
            ValueError: naming the shard folder and both band lists.
        """
        expected = tuple(expected)
        if self.bands != expected:
            raise ValueError(
                f"shards {self.uri} hold bands {','.join(self.bands)}; expected "
                f"{','.join(expected)} (same names, same order)"
            )

    def iter_batches(
        self,
        files: Sequence[str] | None = None,
        batch_size: int = 64,
        columns: Sequence[str] | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield batches of numpy arrays, file by file, in row order.

        Keys (when the column is read): ``ms`` uint16 (N, 10, S, S) with zeros in rows without MS,
        ``has_ms`` bool (N,), ``optical`` uint8 (N, 3, A, A) with zeros in rows without optical,
        ``has_optical`` bool (N,), ``sar`` float32 (N, 2, S, S) and ``has_sar`` when the shards have
        a SAR column, ``bounds`` float64 (N, 4), ``time`` datetime64[us] (N,) (NaT when
        unknown), and the scalar columns as (N,) arrays (strings as object arrays, None when null).

        Args:
            files: shard files to read (default: all of them); lets ranks read disjoint subsets.
            batch_size: rows per batch (the last batch of each file may be smaller).
            columns: columns to read (default: all).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for uri in self.files if files is None else files:
            fs, path = storage.pyarrow_filesystem(uri)
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                for rb in pf.iter_batches(batch_size=batch_size, columns=list(columns) if columns else None):
                    yield batch_to_numpy(rb)


def tensor_column_to_numpy(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A fixed_shape_tensor column as (N, *shape) numpy (zeros in null rows) and its validity mask."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    typ = col.type
    if not isinstance(typ, pa.FixedShapeTensorType):
        raise ValueError(f"expected a fixed_shape_tensor column, got {typ}")
    shape = tuple(typ.shape)
    valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    storage_arr = col.storage
    # .values ignores the slice offset of a sliced array: cut this array's slots out explicitly.
    n = storage_arr.type.list_size
    values = storage_arr.values.slice(storage_arr.offset * n, len(storage_arr) * n)
    if values.null_count:  # Parquet may hand back a null row's slots as nulls
        values = values.fill_null(0)
    arr = values.to_numpy(zero_copy_only=False).reshape((len(col), *shape)).copy()
    arr[~valid] = 0
    return arr, valid


def batch_to_numpy(rb: pa.RecordBatch | pa.Table) -> dict[str, np.ndarray]:
    """Convert a record batch of the shard schema to numpy arrays (see ShardDataset.iter_batches)."""
    out: dict[str, np.ndarray] = {}
    for name in rb.schema.names:
        col = rb.column(name)
        if name in ("ms", "optical", "sar"):
            arr, valid = tensor_column_to_numpy(col)
            out[name] = arr
            out["has_" + name] = valid
        elif name == "bounds":
            out[name] = np.asarray(col.to_pylist(), dtype=np.float64).reshape(len(col), 4)
        elif name == "time":
            out[name] = np.asarray(col.cast(pa.timestamp("us")).to_numpy(zero_copy_only=False),
                                   dtype="datetime64[us]")
        elif pa.types.is_floating(col.type):
            out[name] = col.to_numpy(zero_copy_only=False)
        else:
            out[name] = np.asarray(col.to_pylist(), dtype=object)
    return out
