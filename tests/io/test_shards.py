"""Shard reader: manifest and band checks, numpy batches, local and s3:// (plain pyarrow, no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deo.bands import DEO_BANDS
from deo.config import build_config
from deo.ingest.config import IngestConfig
from deo.ingest.run import ingest
from deo.io.shards import ShardDataset


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("shards") / "out"
    eurosat = sorted((shared_data / "eurosat_ms" / "Highway").glob("*.tif"))[:5]
    cfg = build_config(IngestConfig, overrides=[
        f"s2=[{','.join(map(str, eurosat))}]", f"aerial=[{shared_data / 'neon_rgb/HARV/HARV_001.tif'}]",
        f"output={out}", "use_ray=false", "s2_band_order=eurosat", "rows_per_file=4",
    ])
    ingest(cfg, log=lambda _: None)
    return out, eurosat


def test_batches_hold_tensors_masks_and_metadata(shards):
    out, eurosat = shards
    ds = ShardDataset.open(str(out))
    assert ds.bands == DEO_BANDS and len(ds) == 6 and len(ds.files) == 2
    assert ds.stats["ms"]["mean"] and len(ds.stats["optical"]["std"]) == 3
    batches = list(ds.iter_batches(batch_size=3))
    assert sorted(len(b["sample_id"]) for b in batches) == [1, 2, 3]  # files of 4 and 2 rows, batches of 3
    allb = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert allb["ms"].dtype == np.uint16 and allb["ms"].shape == (6, 10, 64, 64)
    assert allb["optical"].dtype == np.uint8 and allb["optical"].shape == (6, 3, 64, 64)
    assert allb["has_ms"].sum() == 5 and allb["has_optical"].all()
    aerial = ~allb["has_ms"]
    assert (allb["ms"][aerial] == 0).all() and np.isnan(allb["ms_gsd"][aerial]).all()
    assert allb["optical_gsd"][aerial] == pytest.approx(0.5)
    import rasterio

    for i in np.flatnonzero(allb["has_ms"]):
        with rasterio.open(allb["source_ms"][i]) as src:
            x = src.read()
        np.testing.assert_array_equal(allb["ms"][i], np.maximum(x[[1, 2, 3, 4, 5, 6, 7, 12, 10, 11]], 1))
        assert allb["bounds"][i] == pytest.approx(tuple(src.bounds))
    # a column subset and a file subset (ranks read disjoint files)
    only = list(ds.iter_batches(files=ds.files[:1], columns=["sample_id", "lon", "lat"]))
    assert set(only[0]) == {"sample_id", "lon", "lat"}


def test_band_and_version_checks_name_the_shards(shards, tmp_path):
    out, _ = shards
    ds = ShardDataset.open(str(out))
    ds.check_bands(DEO_BANDS)
    wrong = ("B02", "B03", "B04", "B08")
    with pytest.raises(ValueError, match=rf"shards {out}.*B02,B03,B04,B05.*expected B02,B03,B04,B08"):
        ds.check_bands(wrong)
    bad = tmp_path / "old"
    bad.mkdir()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["schema_version"] = 0
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"{bad}/manifest.json: schema_version 0, expected 1"):
        ShardDataset.open(str(bad))
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ShardDataset.open(str(tmp_path / "nothing"))


def test_reads_from_s3(shards, s3_server, s3_bucket):
    out, _ = shards
    uri = s3_server.upload_dir(out, s3_bucket + "/shards")
    local, remote = ShardDataset.open(str(out)), ShardDataset.open(uri)
    assert remote.files[0].startswith("s3://") and remote.manifest == local.manifest
    a = next(local.iter_batches(batch_size=100))
    b = next(remote.iter_batches(batch_size=100))
    np.testing.assert_array_equal(a["ms"], b["ms"])
    assert list(a["sample_id"]) == list(b["sample_id"])
