"""A scene that fails partway: the shards and the manifest agree on exactly which of its tiles exist."""

from __future__ import annotations

import os
import shutil

import numpy as np
import rasterio
from rasterio.windows import Window

from deo.config import build_config
from deo.ingest.config import IngestConfig
from deo.ingest.run import ingest
from deo.io.shards import ShardDataset

L2A = "s2_l2a_tile/sentinel-s2-l2a-cogs/29/R/KH/2020/2/S2A_29RKH_20200219_0_L2A"
FILES = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12", "SCL")


def rewrite_top_first(src_path, dst_path) -> int:
    """Copy a real band with its top block rows and bottom-right block written first, the rest appended
    later; returns the file size after the first part (truncating above it keeps those blocks)."""
    with rasterio.open(src_path) as src:
        data, prof = src.read(1), src.profile
    prof.update(driver="GTiff", tiled=True, blockxsize=128, blockysize=128, compress="deflate")
    h, w = data.shape
    with rasterio.open(dst_path, "w", **prof) as dst:
        dst.write(data[:256], 1, window=Window(0, 0, w, 256))
        br = Window(512, 512, w - 512, h - 512)  # the block the probe reads (last pixel)
        dst.write(data[512:, 512:], 1, window=br)
    first = os.path.getsize(dst_path)
    with rasterio.open(dst_path, "r+") as dst:
        dst.write(data[256:512], 1, window=Window(0, 256, w, 256))
        dst.write(data[512:, :512], 1, window=Window(0, 512, 512, h - 512))
    return first


def rows(out: str) -> dict[tuple, tuple[str, np.ndarray]]:
    """Rows by footprint (sample_ids differ between the two copies: they hash the source path)."""
    ds = ShardDataset.open(out)
    return {tuple(b["bounds"][i]): (b["source_ms"][i], b["ms"][i]) for b in ds.iter_batches(batch_size=500)
            for i in range(len(b["sample_id"]))}


def test_scene_failing_partway_is_partial_with_its_written_tiles(tmp_path, shared_data):
    good, cut = tmp_path / "good" / "T29RKH", tmp_path / "cut" / "T29RKH"
    for d in (good, cut):
        d.mkdir(parents=True)
        for b in FILES:
            if b != "B05":
                shutil.copy(shared_data / L2A / f"{b}.tif", d)
    rewrite_top_first(shared_data / L2A / "B05.tif", good / "B05.tif")
    first = rewrite_top_first(shared_data / L2A / "B05.tif", cut / "B05.tif")
    with open(cut / "B05.tif", "r+b") as f:  # truncated inside the blocks written later
        f.truncate(first + (os.path.getsize(good / "B05.tif") - first) // 3)
    over = ["aerial=[]", "use_ray=false", "max_nodata=1.0", "max_cloud=1.0", "tile.ms_px=64"]
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "out")
    ingest(build_config(IngestConfig, overrides=[f"s2=[{good}]", f"output={ref_out}", *over]), log=lambda _: None)
    cfg = build_config(IngestConfig, overrides=[f"s2=[{cut}]", f"output={out}", *over])
    summary = ingest(cfg, log=lambda _: None)
    ref, got = rows(ref_out), rows(out)
    (entry,) = ShardDataset.open(out).manifest["sources"]
    assert entry["status"] == "partial" and "read failed at window" in entry["reason"]
    assert 0 < len(got) < len(ref) == 17 * 17
    # the manifest's counts are exactly the rows in the shards, and those rows are the clean run's
    assert entry["tiles"] == len(got) == summary["counts"]["rows"] == summary["counts"]["ms"]
    assert set(got) <= set(ref)
    for place, (source, ms) in got.items():
        assert source == str(cut)
        np.testing.assert_array_equal(ms, ref[place][1])
    # what is kept is whole windows (4 x 4 tiles), the first ones in reading order (row-major)
    def window(place: tuple) -> int:
        tx, ty = round((place[0] - 199980) / 6400), round((2800020 - place[3]) / 6400)  # 64 px of 100 m
        return (ty // 4) * 5 + tx // 4
    kept = {window(p) for p in got}
    assert kept == set(range(len(kept)))
    assert set(got) == {p for p in ref if window(p) in kept}
    assert summary["failed"] == [{"uri": str(cut), "reason": entry["reason"]}]
    assert summary["sources"]["partial"] == 1
    # stats describe exactly the written rows (independent: numpy over their valid pixels)
    ms = np.stack([m for _, m in got.values()]).astype(np.float64)
    valid = (ms != 0).all(axis=1)
    mean = [ms[:, b][valid].mean() for b in range(10)]
    np.testing.assert_allclose(ShardDataset.open(out).manifest["stats"]["ms"]["mean"], mean, rtol=1e-9)
    assert f"{cut / 'B05.tif'}: " in entry["reason"]  # which of the scene's band files failed
    # the file fixed (or a transient error gone): the rerun redoes that job instead of keeping the
    # failure on record as done, and the scene is whole
    shutil.copy(good / "B05.tif", cut / "B05.tif")
    again = ingest(cfg, log=lambda _: None)
    (entry,) = ShardDataset.open(out).manifest["sources"]
    assert entry["status"] == "ok" and again["failed"] == [] and len(rows(out)) == len(ref)
