"""Ingest on real imagery (plain loop): values vs direct rasterio reads, resampling, offsets, pairing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.warp import reproject

from deo.bands import DEO_BANDS, offset_for_baseline
from deo.config import build_config
from deo.ingest.config import IngestConfig
from deo.ingest.metadata import read_product_info
from deo.ingest.run import ingest
from deo.io.shards import ShardDataset

L2A = "s2_l2a_tile/sentinel-s2-l2a-cogs/29/R/KH/2020/2/S2A_29RKH_20200219_0_L2A"
L1C = "s2_l1c_tile/sentinel-s2-l1c/tiles/19/U/DP/2017/7/29/0"
N0400 = "S2B_MSIL1C_20220615T101559_N0400_R065_T32UPC_20220615T122549"
N0209 = "S2B_MSIL1C_20200406T101559_N0209_R065_T32UPC_20200406T130159"
NAIP = "naip/m_3607717_sw_18_1_20160620_subset.tif"


def run(tmp: Path, s2: list[str], aerial: list[str] | None = None, **over: object) -> tuple[dict, ShardDataset]:
    args = [f"s2=[{','.join(s2)}]", f"aerial=[{','.join(aerial or [])}]", f"output={tmp / 'out'}",
            "use_ray=false"] + [f"{k}={v}" for k, v in over.items()]
    cfg = build_config(IngestConfig, overrides=args)
    summary = ingest(cfg, log=lambda _: None)
    return summary, ShardDataset.open(str(tmp / "out"))


def rows(ds: ShardDataset) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=100000))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def pixel_window(src: rasterio.io.DatasetReader, bounds: np.ndarray) -> tuple[int, int]:
    col, row = ~src.transform @ (bounds[0], bounds[3])
    return int(round(row)), int(round(col))


def test_l2a_per_band_values_resampling_and_cloud_filter(tmp_path, shared_data):
    tile = shared_data / L2A
    summary, ds = run(tmp_path, [str(tile)], **{"tile.ms_px": 64, "max_cloud": 0.05, "s2_optical": "false"})
    r = rows(ds)
    px = 64
    with rasterio.open(tile / "B02.tif") as ref:
        grid = (ref.transform, ref.crs, ref.width, ref.height)
        direct = {b: rasterio.open(tile / f"{b}.tif").read(1) for b in ("B02", "B03", "B04", "B08")}
    # 20 m bands: independent reference = whole-band bilinear reprojection onto the 10 m grid.
    upsampled = {}
    for b in ("B05", "B11"):
        with rasterio.open(tile / f"{b}.tif") as src:
            out = np.zeros((grid[3], grid[2]), np.uint16)
            reproject(src.read(1), out, src_transform=src.transform, src_crs=src.crs, dst_transform=grid[0],
                      dst_crs=grid[1], resampling=Resampling.bilinear, src_nodata=0, dst_nodata=0)
            upsampled[b] = out
    with rasterio.open(tile / "SCL.tif") as src:
        scl = np.repeat(np.repeat(src.read(1), 2, 0), 2, 1)
    # Which tiles pass the filters, computed independently.
    expected = 0
    for ty in range(grid[3] // px):
        for tx in range(grid[2] // px):
            s = scl[ty * px:(ty + 1) * px, tx * px:(tx + 1) * px]
            if (s == 0).mean() <= 0.1 and np.isin(s, (3, 8, 9, 10)).mean() <= 0.05:
                expected += 1
    assert summary["counts"]["ms"] == expected
    assert summary["counts"]["rejected_cloud"] > 0
    assert ds.bands == DEO_BANDS
    assert r["ms"].dtype == np.uint16 and r["ms"].shape[1:] == (10, px, px)
    for i in range(0, len(r["sample_id"]), 17):
        with rasterio.open(tile / "B02.tif") as ref:
            row, col = pixel_window(ref, r["bounds"][i])
        sl = (slice(row, row + px), slice(col, col + px))
        ms = r["ms"][i]
        valid = ms[0] > 0
        for b in ("B02", "B03", "B04", "B08"):
            np.testing.assert_array_equal(ms[DEO_BANDS.index(b)][valid], np.maximum(direct[b][sl][valid], 1))
        for b, ref_arr in upsampled.items():
            diff = np.abs(ms[DEO_BANDS.index(b)][valid].astype(int) - ref_arr[sl][valid].astype(int))
            assert diff.max() <= 1, (b, diff.max())
        assert r["ms_gsd"][i] == pytest.approx(100.0)
    assert (r["has_optical"] == False).all()  # noqa: E712 - s2_optical off, no aerial


def test_stacked_eurosat_preset_band_order(tmp_path, shared_data):
    files = sorted((shared_data / "eurosat_ms" / "River").glob("*.tif"))[:3]
    _, ds = run(tmp_path, [str(f) for f in files], s2_band_order="eurosat")
    r = rows(ds)
    assert len(r["sample_id"]) == 3
    for i, src_uri in enumerate(r["source_ms"]):
        with rasterio.open(src_uri) as src:
            x = src.read()
        ten = x[[1, 2, 3, 4, 5, 6, 7, 12, 10, 11]]  # B8A is the last band in EuroSAT files
        np.testing.assert_array_equal(r["ms"][i], np.maximum(ten, 1))
        # the true colour fallback: B04 B03 B02 scaled linearly, 3000 -> 255
        tc = np.clip(np.rint(np.maximum(x[[3, 2, 1]], 1).astype(np.float32) * (255 / 3000)), 0, 255)
        np.testing.assert_array_equal(r["optical"][i], tc.astype(np.uint8))


def test_baseline_offset_removed_from_mtd_and_not_from_older_baseline(tmp_path, shared_data):
    base = shared_data / "s2_baselines"
    summary, ds = run(tmp_path, [str(base)], s2_band_order="s2_13", **{"tile.ms_px": 4, "max_nodata": 1.0})
    m = ds.manifest
    by_uri = {Path(s["uri"]).name: s for s in m["sources"]}
    assert by_uri[f"{N0400}.tif"]["offset"] == 1000 and by_uri[f"{N0400}.tif"]["offset_from"] == "mtd_xml"
    assert by_uri[f"{N0209}.tif"]["offset"] == 0
    assert by_uri[f"{N0209}_toa.tif"]["status"] == "failed"  # float32 reflectance is not a DN product
    r = rows(ds)
    checked = 0
    for name in (N0400, N0209):
        with rasterio.open(base / f"{name}_toa.tif") as t, rasterio.open(base / f"{name}.tif") as dn:
            toa = t.read()[[1, 2, 3, 4, 5, 6, 7, 8, 11, 12]]
            raw = dn.read()[[1, 2, 3, 4, 5, 6, 7, 8, 11, 12]]
            for i in np.flatnonzero(r["source_ms"] == str(base / f"{name}.tif")):
                row, col = pixel_window(dn, r["bounds"][i])
                sl = (slice(None), slice(row, row + 4), slice(col, col + 4))
                valid = (raw[sl] != 0).all(0) & (raw[sl] != 65535).all(0)
                expect = np.clip(np.rint(toa[sl] * 10000), 1, None).astype(np.uint16)
                np.testing.assert_array_equal(r["ms"][i][:, valid], expect[:, valid])
                assert (r["ms"][i][:, ~valid] == 0).all()
                checked += 1
    assert checked == 2 * 2 + 2 * 2  # 9x8 and 10x10 crops hold 2x2 tiles of 4 px each


def test_l1c_jp2_named_geotiffs_and_swath_nodata(tmp_path, shared_data):
    tile = shared_data / L1C
    summary, ds = run(tmp_path, [str(tile)], **{"tile.ms_px": 16, "max_nodata": 0.2})
    with rasterio.open(tile / "B02.jp2") as src:
        assert src.driver == "GTiff"
        zeros = np.zeros((src.height, src.width), bool)
        for b in DEO_BANDS:
            with rasterio.open(tile / f"{b}.jp2") as bsrc:
                zeros |= bsrc.read(1) == 0
    expected = rejected = 0
    for ty in range(122 // 16):
        for tx in range(122 // 16):
            frac = zeros[ty * 16:(ty + 1) * 16, tx * 16:(tx + 1) * 16].mean()
            expected += frac <= 0.2
            rejected += frac > 0.2
    assert summary["counts"]["ms"] == expected
    assert summary["counts"]["rejected_nodata"] == rejected > 0
    src_entry = next(s for s in ds.manifest["sources"] if s["kind"] == "s2_bands")
    assert src_entry["level"] == "L1C" and src_entry["offset_from"] == "product_name"
    r = rows(ds)
    assert r["time"][0] == np.datetime64("2017-07-29T15:35:57.455")


def test_pairing_across_crs(tmp_path, shared_data):
    # No real aerial image overlaps a real S2 scene here, so real S2 pixels (L2A 29RKH) are written on a
    # 10 m grid in EPSG:32617 inside the footprint of a NAIP image stored in EPSG:26918.
    with rasterio.open(shared_data / L2A / "B02.tif") as src:
        profile = src.profile
    stack = np.stack([rasterio.open(shared_data / L2A / f"{b}.tif").read(1)[:20, :20] for b in DEO_BANDS])
    profile.update(count=10, width=20, height=20, crs="EPSG:32617",
                   transform=Affine(10, 0, 768040, 0, -10, 4057230), driver="GTiff", tiled=False)
    profile.pop("blockxsize"), profile.pop("blockysize")
    s2 = tmp_path / "s2" / "moved.tif"
    s2.parent.mkdir()
    with rasterio.open(s2, "w", **profile) as dst:
        dst.write(stack)
        for i, b in enumerate(DEO_BANDS, 1):
            dst.set_band_description(i, b)
    naip = shared_data / NAIP
    summary, ds = run(tmp_path, [str(s2)], [str(naip)], **{"tile.ms_px": 10, "tile.optical_px": 20})
    assert summary["counts"]["paired"] == 4
    r = rows(ds)
    paired = np.flatnonzero(r["has_ms"] & (r["source_optical"] == str(naip)))
    assert len(paired) == 4
    with rasterio.open(naip) as src:
        naip_rgb = src.read([1, 2, 3])
        for i in paired:
            left, bottom, right, top = r["bounds"][i]
            out = np.zeros((3, 20, 20), np.uint8)
            reproject(naip_rgb, out, src_transform=src.transform, src_crs=src.crs,
                      dst_transform=Affine((right - left) / 20, 0, left, 0, -(top - bottom) / 20, top),
                      dst_crs="EPSG:32617", resampling=Resampling.average)
            diff = np.abs(r["optical"][i].astype(int) - out.astype(int))
            assert diff.max() <= 2 and diff.mean() < 0.5
            assert r["optical_gsd"][i] == pytest.approx(5.0)
            assert r["crs"][i] == "EPSG:32617"
    # NAIP is also tiled alone at optical_gsd (rows without MS)
    alone = ~r["has_ms"]
    assert alone.sum() == (300 // 0.5 // 20) ** 2
    assert np.allclose(r["optical_gsd"][alone], 0.5)


def test_manifest_stats_and_counts_match_the_shards(tmp_path, shared_data):
    files = sorted((shared_data / "eurosat_ms" / "Forest").glob("*.tif"))[:4]
    summary, ds = run(tmp_path, [str(f) for f in files], [str(shared_data / "neon_rgb/HARV/HARV_001.tif")],
                      s2_band_order="eurosat")
    r = rows(ds)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["counts"]["ms"] == r["has_ms"].sum() == 4
    assert m["counts"]["rows"] == len(r["sample_id"]) == 5
    ms = r["ms"][r["has_ms"]].transpose(1, 0, 2, 3).reshape(10, -1).astype(np.float64)
    valid = (ms > 0).all(0)
    np.testing.assert_allclose(m["stats"]["ms"]["mean"], ms[:, valid].mean(1), rtol=1e-9)
    np.testing.assert_allclose(m["stats"]["ms"]["std"], ms[:, valid].std(1), rtol=1e-6)
    # optical stats: what training reads, the optical tiles of the rows with ms (not the aerial-only row)
    trained = r["has_ms"] & r["has_optical"]
    assert trained.sum() == 4 and (r["has_optical"] & ~r["has_ms"]).sum() == 1
    opt = r["optical"][trained].transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(m["stats"]["optical"]["mean"], opt.mean(1), rtol=1e-9)
    np.testing.assert_allclose(m["stats"]["optical"]["std"], opt.std(1), rtol=1e-6)
    assert m["schema_version"] == 1 and m["bands"]["ms"] == list(DEO_BANDS)
    assert m["config"]["s2_band_order"] == ["eurosat"] and len(m["config_hash"]) == 16
    assert {s["status"] for s in m["sources"]} == {"ok"}
    schema = pq.read_schema(ds.files[0])
    assert schema.metadata[b"deo.ms_bands"].decode() == ",".join(DEO_BANDS)
    assert str(schema.field("ms").type) == "extension<arrow.fixed_shape_tensor[value_type=uint16, shape=[10,64,64]]>"


def test_without_optical_tiles_the_stats_count_the_true_colour_training_fills_in(tmp_path, shared_data):
    """s2_optical=false and no aerial: the optical stats describe the S2 true colour the loader fills in
    (they were null, and MultiCrop then failed with a TypeError); s2_optical_max reaches the fill."""
    import torch

    from deo.data.loader import fill_true_colour
    from deo.data.multicrop import MultiCrop
    from deo.train.config import ViewConfig

    files = sorted((shared_data / "eurosat_ms" / "River").glob("*.tif"))[:3]
    _, ds = run(tmp_path, [str(f) for f in files], s2_band_order="eurosat", s2_optical="false",
                s2_optical_max=2500)
    r = rows(ds)
    assert not r["has_optical"].any()
    ms = torch.from_numpy(r["ms"].astype(np.int32))
    filled = fill_true_colour(ms, torch.zeros(len(ms), 3, 64, 64, dtype=torch.uint8),
                              torch.zeros(len(ms), dtype=torch.bool), max_value=2500).numpy()
    valid = (r["ms"] > 0).all(1)
    want = np.stack([filled[:, c][valid] for c in range(3)]).astype(np.float64)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    np.testing.assert_allclose(m["stats"]["optical"]["mean"], want.mean(1), rtol=1e-9)
    np.testing.assert_allclose(m["stats"]["optical"]["std"], want.std(1), rtol=1e-6)
    # the stretch travels with the stats: training's fill-in and evaluation's true colour use it
    assert m["stats"]["optical"]["s2_true_colour_max"] == 2500
    assert MultiCrop(ViewConfig(), m["stats"]).true_colour_max == 2500
    from deo.bands import true_colour_max
    from deo.eval.datasets import s2_true_colour

    np.testing.assert_array_equal(s2_true_colour(ms, true_colour_max(m["stats"])).numpy().astype(np.uint8), filled)
    with pytest.raises(ValueError, match="stats.optical has no values.*re-ingest"):
        MultiCrop(ViewConfig(), {**m["stats"], "optical": {"mean": [None] * 3, "std": [None] * 3}})
    # re-ingesting shards whose job summaries an older version wrote (optical stats counted otherwise,
    # and no stats_version) redoes those jobs instead of reusing their stats
    for part in (tmp_path / "out" / "_parts").glob("*.json"):
        record = json.loads(part.read_text())
        record.pop("stats_version")
        record["optical_stats"] = {k: [0.0] * len(v) if isinstance(v, list) else 0
                                   for k, v in record["optical_stats"].items()}
        part.write_text(json.dumps(record))
    run(tmp_path, [str(f) for f in files], s2_band_order="eurosat", s2_optical="false", s2_optical_max=2500)
    again = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert again["stats"]["optical"] == m["stats"]["optical"]


def test_baseline_04_00_is_the_first_with_the_offset():
    assert offset_for_baseline((4, 0)) == 1000 and offset_for_baseline((5, 11)) == 1000
    assert offset_for_baseline((3, 99)) == 0 and offset_for_baseline(None) is None
    name = "S2B_MSIL1C_20220615T101559_N0400_R065_T32UPC_20220615T122549"
    info = read_product_info(f"/data/{name}.SAFE", [], False, 0)
    assert (info.offset, info.offset_from) == (1000, "product_name")


def test_dark_pixels_below_the_offset_stay_valid_and_the_name_gives_the_offset(tmp_path, shared_data):
    """An N0400 product without its MTD: the product name gives the +1000 offset; a valid pixel whose DN is
    at or below the offset (dark water) is reflectance 1, never 0 (0 marks nodata)."""
    name = "S2B_MSIL1C_20220615T101559_N0400_R065_T32UPC_20220615T122549"
    src_dir, dst_dir = shared_data / "s2_baselines", tmp_path / "in"
    dst_dir.mkdir()
    with rasterio.open(src_dir / f"{name}.tif") as src:
        data, profile = src.read(), src.profile
    data[:, :4, :4] = 800  # valid (non-zero) DN below the offset
    with rasterio.open(dst_dir / f"{name}.tif", "w", **profile) as dst:
        dst.write(data)
    cfg = build_config(IngestConfig, overrides=[f"s2=[{dst_dir}]", "aerial=[]", f"output={tmp_path / 'out'}",
                                                "use_ray=false", "s2_band_order=s2_13", "tile.ms_px=4",
                                                "max_nodata=1.0"])
    ingest(cfg, log=lambda _: None)
    ds = ShardDataset.open(str(tmp_path / "out"))
    (source,) = [s for s in ds.manifest["sources"] if s["uri"].endswith(f"{name}.tif")]
    assert (source["offset"], source["offset_from"]) == (1000, "product_name")
    batches = list(ds.iter_batches(batch_size=100000))
    ms = np.concatenate([b["ms"] for b in batches])
    bounds = np.concatenate([b["bounds"] for b in batches])
    with rasterio.open(dst_dir / f"{name}.tif") as src:
        left, top = src.transform @ (0, 0)
    corner = [i for i in range(len(ms)) if np.allclose(bounds[i][[0, 3]], (left, top))]
    assert corner, "the top-left tile was written"
    assert (ms[corner[0]] == 1).all()
