"""Ingest on small synthetic scenes: the pixel masks, the filters' boundaries, tile bounds, pairing threshold.

Every raster is written here (UTM 32N, 10 m), so each expectation is exact and independent of the code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.warp import transform as warp_transform

from deo.bands import DEO_BANDS
from deo.config import build_config
from deo.ingest.config import IngestConfig
from deo.ingest.run import ingest
from deo.io.shards import ShardDataset

CRS = "EPSG:32632"
LEFT, TOP = 500000.0, 5200000.0


def write_scene(folder: Path, data: np.ndarray, scl: np.ndarray | None = None, nodata: float | None = None) -> Path:
    """One per-band scene (B02.tif ... B12.tif, optional SCL.tif) on a 10 m grid at (LEFT, TOP)."""
    folder.mkdir(parents=True)
    h, w = data.shape[1:]
    prof = dict(driver="GTiff", width=w, height=h, count=1, dtype="uint16", crs=CRS,
                transform=Affine(10, 0, LEFT, 0, -10, TOP))
    for i, b in enumerate(DEO_BANDS):
        with rasterio.open(folder / f"{b}.tif", "w", nodata=nodata, **prof) as dst:
            dst.write(data[i], 1)
    if scl is not None:
        with rasterio.open(folder / "SCL.tif", "w", **{**prof, "dtype": "uint8"}) as dst:
            dst.write(scl.astype(np.uint8), 1)
    return folder


def run(tmp: Path, s2: list[str], aerial: list[str] | None = None, **over: object) -> tuple[dict, dict]:
    args = [f"s2=[{','.join(s2)}]", f"aerial=[{','.join(aerial or [])}]", "sar=[]", f"output={tmp / 'out'}",
            "use_ray=false", "s2_optical=false"] + [f"{k}={v}" for k, v in over.items()]
    summary = ingest(build_config(IngestConfig, overrides=args), log=lambda _: None)
    batches = list(ShardDataset.open(str(tmp / "out")).iter_batches(batch_size=100000))
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]} if batches else {}
    return summary, rows


def test_scl_no_data_class_masks_pixels_and_rejects_tiles(tmp_path):
    # 8x8 scene, 4x4 tiles. Bands are valid everywhere; SCL says "no data" (class 0) on one pixel of the
    # top-left tile and on half of the top-right tile.
    data = np.full((10, 8, 8), 1000, np.uint16)
    scl = np.full((8, 8), 4, np.uint8)
    scl[1, 2] = 0
    scl[0:2, 4:8] = 0
    summary, r = run(tmp_path, [str(write_scene(tmp_path / "s", data, scl))],
                     **{"tile.ms_px": 4, "max_nodata": 0.1})
    assert summary["counts"]["ms"] == 3 and summary["counts"]["rejected_nodata"] == 1
    tl = [i for i, b in enumerate(r["bounds"]) if b[0] == LEFT and b[3] == TOP]
    assert len(tl) == 1
    ms = r["ms"][tl[0]]
    assert (ms[:, 1, 2] == 0).all()          # the SCL no-data pixel is written as no data
    assert (ms[:, 0, 0] == 1000).all()


def test_declared_nodata_in_any_band_invalidates_the_pixel(tmp_path):
    # A stacked 10-band file declaring nodata=7; one band alone holds 7 at pixel (2, 3): the pixel is no data.
    data = np.full((10, 4, 4), 1000, np.uint16)
    data[5, 2, 3] = 7
    f = tmp_path / "s" / "stack.tif"
    f.parent.mkdir()
    with rasterio.open(f, "w", driver="GTiff", width=4, height=4, count=10, dtype="uint16", crs=CRS, nodata=7,
                       transform=Affine(10, 0, LEFT, 0, -10, TOP)) as dst:
        dst.write(data)
        for i, b in enumerate(DEO_BANDS, 1):
            dst.set_band_description(i, b)
    summary, r = run(tmp_path, [str(f)], **{"tile.ms_px": 4, "max_nodata": 1.0})
    assert summary["counts"]["ms"] == 1
    ms = r["ms"][0]
    assert (ms[:, 2, 3] == 0).all()
    assert (ms[:, 0, 0] == 1000).all()


def test_nodata_and_cloud_fractions_equal_to_the_limits_are_kept(tmp_path):
    # Four 4x4 tiles: exactly 4/16 no data (band 0 = 0), exactly 4/16 cloud (SCL 9), 5/16 no data, 5/16 cloud.
    data = np.full((10, 8, 8), 1000, np.uint16)
    scl = np.full((8, 8), 4, np.uint8)
    data[0, 0, 0:4] = 0                  # top-left: 0.25 no data
    scl[0, 4:8] = 9                      # top-right: 0.25 cloud
    data[0, 4, 0:4] = 0
    data[0, 5, 0] = 0                    # bottom-left: 0.3125 no data
    scl[4, 4:8] = 9
    scl[5, 4] = 9                        # bottom-right: 0.3125 cloud
    summary, r = run(tmp_path, [str(write_scene(tmp_path / "s", data, scl))],
                     **{"tile.ms_px": 4, "max_nodata": 0.25, "max_cloud": 0.25})
    c = summary["counts"]
    assert (c["ms"], c["rejected_nodata"], c["rejected_cloud"]) == (2, 1, 1)
    assert sorted((b[0], b[3]) for b in r["bounds"]) == [(LEFT, TOP), (LEFT + 40, TOP)]


def test_tile_bounds_and_centre(tmp_path):
    data = np.full((10, 8, 12), 1000, np.uint16)
    summary, r = run(tmp_path, [str(write_scene(tmp_path / "s", data))], **{"tile.ms_px": 4})
    assert summary["counts"]["ms"] == 6
    got = sorted(tuple(b) for b in r["bounds"])
    want = sorted((LEFT + 40 * i, TOP - 40 * (j + 1), LEFT + 40 * (i + 1), TOP - 40 * j)
                  for i in range(3) for j in range(2))
    np.testing.assert_allclose(got, want)
    for b, lon, lat in zip(r["bounds"], r["lon"], r["lat"], strict=True):
        (elon,), (elat,) = warp_transform(CRS, "EPSG:4326", [(b[0] + b[2]) / 2], [(b[1] + b[3]) / 2])
        assert lon == pytest.approx(elon) and lat == pytest.approx(elat)
        (clon,), (clat,) = warp_transform(CRS, "EPSG:4326", [b[0] + 20], [b[3] - 20])
        assert lon == pytest.approx(clon) and lat == pytest.approx(clat)


def test_fully_covering_aerial_is_paired_even_with_max_nodata_zero(tmp_path):
    data = np.full((10, 4, 4), 1000, np.uint16)
    scene = write_scene(tmp_path / "s", data)
    rng = np.random.default_rng(0)
    aerial = tmp_path / "a" / "aerial.tif"
    aerial.parent.mkdir()
    # 1 m aerial over a larger footprint than the 40 m scene
    with rasterio.open(aerial, "w", driver="GTiff", width=60, height=60, count=3, dtype="uint8", crs=CRS,
                       transform=Affine(1, 0, LEFT - 10, 0, -1, TOP + 10)) as dst:
        dst.write(rng.integers(1, 255, (3, 60, 60), dtype=np.uint8))
    summary, r = run(tmp_path, [str(scene)], [str(aerial)],
                     **{"tile.ms_px": 4, "tile.optical_px": 8, "max_nodata": 0.0, "optical_gsd": 5.0})
    assert summary["counts"]["paired"] == 1
    ms_rows = np.flatnonzero(r["has_ms"])
    assert len(ms_rows) == 1 and r["source_optical"][ms_rows[0]] == str(aerial)


def test_aerial_tiles_downsample_by_block_average(tmp_path):
    # 0.5 m random aerial tiled at optical_gsd 1.0: each output pixel is the mean of its 2x2 block.
    rng = np.random.default_rng(1)
    img = rng.integers(1, 255, (3, 32, 32), dtype=np.uint8)
    aerial = tmp_path / "a" / "aerial.tif"
    aerial.parent.mkdir()
    with rasterio.open(aerial, "w", driver="GTiff", width=32, height=32, count=3, dtype="uint8", crs=CRS,
                       transform=Affine(0.5, 0, LEFT, 0, -0.5, TOP)) as dst:
        dst.write(img)
    _, r = run(tmp_path, [], [str(aerial)], **{"tile.optical_px": 16, "optical_gsd": 1.0})
    assert len(r["optical"]) == 1
    want = img.astype(float).reshape(3, 16, 2, 16, 2).mean(axis=(2, 4))
    diff = np.abs(r["optical"][0].astype(float) - want)
    assert diff.max() <= 1.0
