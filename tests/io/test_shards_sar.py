"""The optional ``sar`` column: written by deo.io.shards, read back equal to the S1 GeoTIFFs."""

import numpy as np
import pyarrow.parquet as pq
import rasterio

from deo.io.shards import ShardDataset, shard_schema

from conftest import BIGEARTHNET_TILE, SHARED_DATA, bigearthnet_pairs


def test_schema_without_sar_is_unchanged_and_with_sar_adds_a_float32_tensor():
    assert "sar" not in shard_schema(64, 64).names
    schema = shard_schema(64, 128, sar=True)
    typ = schema.field("sar").type
    assert str(typ.value_type) == "float" and list(typ.shape) == [2, 64, 64]
    assert schema.field("sar").nullable
    assert schema.metadata[b"deo.sar_bands"] == b"VV,VH"


def test_sar_round_trip_equals_the_s1_files(bigearthnet_sar_shards):
    ds = ShardDataset.open(str(bigearthnet_sar_shards))
    batch = next(ds.iter_batches(batch_size=100))
    ids = list(batch["sample_id"])
    t = BIGEARTHNET_TILE
    s2, s1 = bigearthnet_pairs(SHARED_DATA)[2]
    with rasterio.open(next(s1.glob("*_VV.tif"))) as vv, rasterio.open(next(s1.glob("*_VH.tif"))) as vh:
        want = np.stack([vv.read(1), vh.read(1)])[:, t:, :t]  # tile 2 = bottom-left
    row = ids.index(f"{s2.name}_2")
    assert batch["sar"].dtype == np.float32 and batch["sar"].shape[1:] == (2, t, t)
    np.testing.assert_array_equal(batch["sar"][row], want)
    assert batch["has_sar"].sum() == len(ids) - 1
    assert not batch["has_sar"][ids.index("no-sar")] and not batch["sar"][ids.index("no-sar")].any()
    assert pq.read_schema(ds.files[0]).field("sar").nullable
