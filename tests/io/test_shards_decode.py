"""Shard reader details: sliced and null tensor rows, the manifest's file list, the weighted GSD median."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from deo.io.shards import (
    SCHEMA_VERSION,
    ShardDataset,
    manifest_gsd,
    ms_type,
    rows_to_table,
    shard_schema,
    tensor_column_to_numpy,
    write_table,
)


def _ms_rows(n: int, px: int = 2) -> list[dict]:
    return [{"sample_id": f"r{i}", "ms": np.full((10, px, px), i + 1, np.uint16), "optical": None}
            for i in range(n)]


def test_tensor_column_of_a_sliced_array_starts_at_the_slice():
    table = rows_to_table(_ms_rows(5), shard_schema(2, 2))
    col = table.column("ms").combine_chunks().slice(2, 2)
    arr, valid = tensor_column_to_numpy(col)
    assert arr.shape == (2, 10, 2, 2) and valid.all()
    assert (arr[0] == 3).all() and (arr[1] == 4).all()


def test_null_tensor_rows_decode_as_zeros_whatever_their_slots_hold():
    typ = ms_type(2)
    size = 10 * 2 * 2
    flat = np.arange(1, 3 * size + 1, dtype=np.uint16)  # non-zero slots under the null row too
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat), size, mask=pa.array([False, True, False]))
    arr, valid = tensor_column_to_numpy(pa.ExtensionArray.from_storage(typ, storage))
    assert valid.tolist() == [True, False, True]
    assert (arr[1] == 0).all() and arr[0].reshape(-1)[0] == 1 and arr[2].reshape(-1)[0] == 2 * size + 1


def test_the_manifests_file_list_is_what_is_read(tmp_path):
    schema = shard_schema(2, 2)
    write_table(str(tmp_path / "part-a.parquet"), rows_to_table(_ms_rows(3), schema))
    write_table(str(tmp_path / "part-stale.parquet"), rows_to_table(_ms_rows(7), schema))
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "files": ["part-a.parquet"],
                                                        "counts": {"rows": 3}}))
    ds = ShardDataset.open(str(tmp_path))
    assert ds.files == [str(tmp_path / "part-a.parquet")]
    assert sum(len(b["sample_id"]) for b in ds.iter_batches(columns=["sample_id"])) == 3


def test_weighted_median_gsd_at_an_exact_half_is_the_lower_value():
    manifest = {"tile": {"ms_px": 4, "optical_px": 8}, "sources": [
        {"kind": "s2_bands", "status": "ok", "gsd": 10.0, "tiles": 10},
        {"kind": "s2_bands", "status": "ok", "gsd": 20.0, "tiles": 10}]}
    gsd, rng = manifest_gsd(manifest)
    assert gsd == {"ms": 10.0, "optical": 5.0}
    assert rng == {"ms": [10.0, 20.0], "optical": [5.0, 10.0]}
