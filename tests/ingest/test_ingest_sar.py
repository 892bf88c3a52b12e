"""Sentinel-1 ingestion: real BigEarthNet S1 + S2 patches (from S3) -> `sar` column, manifest, training."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import calculate_default_transform, reproject
from rasterio.windows import from_bounds

from deo.config import build_config, read_yaml
from deo.ingest.config import IngestConfig
from deo.ingest.run import ingest
from deo.io.shards import ShardDataset

from conftest import bigearthnet_pairs

REPO = Path(__file__).resolve().parents[2]


def cfg_for(out: str, s2: list[str], sar: list[str], **over: object) -> IngestConfig:
    args = [f"s2=[{','.join(s2)}]", f"sar=[{','.join(sar)}]", "aerial=[]", f"output={out}", "use_ray=false",
            *(f"{k}={v}" for k, v in over.items())]
    return build_config(IngestConfig, overrides=args)


def rows_of(out: str) -> dict[str, dict]:
    ds = ShardDataset.open(out)
    rows = {}
    for b in ds.iter_batches(batch_size=1000):
        for i, sid in enumerate(b["sample_id"]):
            rows[sid] = {k: v[i] for k, v in b.items()}
    return rows


def test_bigearthnet_from_s3_sar_column_manifest_and_rerun(tmp_path, shared_data, s3_server, s3_bucket):
    pairs = bigearthnet_pairs(shared_data)
    local = tmp_path / "in"
    for s2, _ in pairs[:5]:  # the 6th S1 pair's S2 patch is left out: that pair covers no MS tile
        shutil.copytree(s2, local / "s2" / s2.name)
    for _, s1 in pairs:
        shutil.copytree(s1, local / "s1" / s1.name)
    remote = s3_server.upload_dir(local, s3_bucket + "/in")
    out = s3_bucket + "/shards"
    cfg = cfg_for(out, [remote + "/s2"], [remote + "/s1"], **{"tile.ms_px": 60, "tile.optical_px": 60})
    summary = ingest(cfg, log=lambda _: None)
    ds = ShardDataset.open(out)
    rows = rows_of(out)
    assert summary["counts"]["sar"] == ds.manifest["counts"]["sar"] == len(rows) == 5 * 4
    # values: each tile's sar equals the S1 files read directly at the tile's bounds (same 10 m grid)
    by_patch = {s2.name: s1 for s2, s1 in pairs}
    for r in rows.values():
        s1 = by_patch[r["source_ms"].rsplit("/", 1)[-1]]
        want = []
        for pol in ("VV", "VH"):
            with rasterio.open(next(s1.glob(f"*_{pol}.tif"))) as src:
                win = from_bounds(*r["bounds"], transform=src.transform).round_offsets().round_lengths()
                want.append(src.read(1, window=win))
        assert r["has_sar"] and r["sar"].dtype == np.float32
        np.testing.assert_array_equal(r["sar"], np.stack(want))
    # manifest: bands, stats over every SAR pixel (independent: numpy over the S1 files of the 5 pairs)
    m = ds.manifest
    assert m["bands"]["sar"] == ["VV", "VH"]
    ref = np.stack([np.stack([rasterio.open(next(s1.glob(f"*_{p}.tif"))).read(1) for p in ("VV", "VH")])
                    for _, s1 in pairs[:5]]).astype(np.float64)
    np.testing.assert_allclose(m["stats"]["sar"]["mean"], ref.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(m["stats"]["sar"]["std"], ref.std(axis=(0, 2, 3)), rtol=1e-6)
    s1_entries = {e["uri"].rsplit("/", 1)[-1]: e for e in m["sources"] if e["kind"] == "s1_pair"}
    lonely = s1_entries[pairs[5][1].name]
    assert lonely["status"] == "skipped" and "covers no ingested MS tile" in lonely["reason"]
    assert lonely["tiles"] == 0
    assert all(s1_entries[s1.name]["status"] == "ok" and s1_entries[s1.name]["tiles"] == 4
               for _, s1 in pairs[:5])
    # idempotent rerun: same files, same rows and values
    files = sorted(ds.files)
    ingest(cfg, log=lambda _: None)
    again = ShardDataset.open(out)
    assert sorted(again.files) == files and again.manifest["counts"] == m["counts"]
    rows2 = rows_of(out)
    assert rows2.keys() == rows.keys()
    for k in rows:
        np.testing.assert_array_equal(rows2[k]["sar"], rows[k]["sar"])


def test_sar_in_another_crs_is_warped_onto_the_ms_tile_grid(tmp_path, shared_data):
    s2, s1 = bigearthnet_pairs(shared_data)[0]
    moved = tmp_path / "s1" / s1.name
    moved.mkdir(parents=True)
    dst_crs = CRS.from_epsg(3857)  # Web Mercator: rotated and scaled against the patch's UTM grid
    for f in s1.glob("*_V?.tif"):
        with rasterio.open(f) as src:
            transform, w, h = calculate_default_transform(src.crs, dst_crs, src.width, src.height,
                                                          *src.bounds, resolution=12.0)
            full = np.full((h, w), np.nan, np.float32)
            reproject(rasterio.band(src, 1), full, dst_transform=transform, dst_crs=dst_crs,
                      resampling=Resampling.bilinear, dst_nodata=float("nan"))
            keep = int(w * 0.6)  # only the western 60%: the middle and eastern tiles are not wholly covered
            prof = {**src.profile, "crs": dst_crs, "transform": transform, "width": keep, "height": h,
                    "nodata": float("nan")}
            with rasterio.open(moved / f.name, "w", **prof) as dst:
                dst.write(full[:, :keep], 1)
    out = str(tmp_path / "out")
    ingest(cfg_for(out, [str(s2)], [str(tmp_path / "s1")], **{"tile.ms_px": 40, "tile.optical_px": 40}),
           log=lambda _: None)
    rows = rows_of(out)
    assert len(rows) == 9
    with_sar = [r for r in rows.values() if r["has_sar"]]
    with rasterio.open(next(s2.glob("*_B02.tif"))) as src:
        west = src.bounds.left
    assert sorted(r["bounds"][0] for r in with_sar) == [west] * 3  # the western column only
    assert all(not r["sar"].any() for r in rows.values() if not r["has_sar"])
    for r in with_sar:
        left, bottom, right, top = r["bounds"]
        ref = np.empty((2, 40, 40), np.float32)
        for k, pol in enumerate(("VV", "VH")):
            with rasterio.open(next(moved.glob(f"*_{pol}.tif"))) as src:
                reproject(rasterio.band(src, 1), ref[k], dst_crs=CRS.from_string(r["crs"]),
                          dst_transform=rasterio.transform.from_bounds(left, bottom, right, top, 40, 40),
                          resampling=Resampling.bilinear, src_nodata=float("nan"), dst_nodata=float("nan"))
        # GDAL's WarpedVRT (ingest) and reproject (here) pick source windows differently: they agree to
        # ~0.05 dB on average, ~0.5 dB at worst on this speckle (std 3.5 dB; a 1 px shift gives ~3 dB)
        diff = np.abs(r["sar"] - ref)
        assert diff.mean() < 0.1 and diff.max() < 1.0, (diff.mean(), diff.max())
        # and close to the original UTM pixels (two bilinear resamplings of speckle: loose)
        with rasterio.open(next(s1.glob("*_VV.tif"))) as src:
            orig = src.read(1, window=from_bounds(left, bottom, right, top, transform=src.transform))
        assert np.corrcoef(orig.ravel(), r["sar"][0].ravel())[0, 1] > 0.6


def test_pretrain_xstars_consumes_ingested_bigearthnet_sar(tmp_path, shared_data):
    from deo.export import read_export
    from deo.train.config import PretrainConfig
    from deo.train.loop import train
    from deo.train.runtime import LocalRuntime

    yaml = read_yaml(REPO / "configs/ingest/bigearthnet.yaml")
    yaml.update(s2=[str(shared_data / "bigearthnet/BigEarthNet-S2-Example")],
                sar=[str(shared_data / "bigearthnet/BigEarthNet-S1-Example")])
    shards = tmp_path / "shards"
    ingest(build_config(IngestConfig, yaml, [f"output={shards}", "use_ray=false"]), log=lambda _: None)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["counts"]["sar"] == manifest["counts"]["rows"] == 6  # one 120 px tile per patch
    cfg = build_config(PretrainConfig, read_yaml(REPO / "configs/pretrain/xstars.yaml"), [
        f"data={shards}", f"run.storage={tmp_path}", "run.name=sar", "model.sar=true", "train.max_steps=3",
        "train.batch_size=4", "views.n_local=2", "run.log_every=1", "run.tensorboard=false",
        "train.warmup_steps=1"])
    uri = str(tmp_path / "sar")
    summary = train(cfg, LocalRuntime(uri, keep=cfg.run.keep_checkpoints, device=torch.device("cpu")), uri)
    assert summary.steps == 3
    lines = [json.loads(x) for x in (tmp_path / "sar" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(math.isfinite(r["msad"]) and r["msad"] > 0 for r in lines)
    _, meta = read_export(str(tmp_path / "sar" / "backbone.safetensors"))
    assert meta["bands"]["sar"] == ["VV", "VH"] and meta["stats"]["sar"] == manifest["stats"]["sar"]


def test_a_sar_crop_with_invalid_pixels_inside_its_bounds_is_not_paired(tmp_path, shared_data):
    """Bounds covering the tile are not enough: a crop with a NaN (no data) pixel leaves the tile without SAR."""
    s2, s1 = bigearthnet_pairs(shared_data)[0]
    holed = tmp_path / "s1" / s1.name
    holed.mkdir(parents=True)
    for f in s1.glob("*_V?.tif"):
        with rasterio.open(f) as src:
            data, prof = src.read(1), src.profile
        if f.name.endswith("_VV.tif"):
            data = data.astype(np.float32)
            data[58:61, 58:61] = np.nan  # inside the centre tile of the 3 x 3 (40 px tiles of 120 px)
            prof = {**prof, "dtype": "float32"}
        with rasterio.open(holed / f.name, "w", **prof) as dst:
            dst.write(data, 1)
    out = str(tmp_path / "out")
    ingest(cfg_for(out, [str(s2)], [str(tmp_path / "s1")], **{"tile.ms_px": 40, "tile.optical_px": 40}),
           log=lambda _: None)
    rows = rows_of(out)
    assert len(rows) == 9
    with rasterio.open(next(s2.glob("*_B02.tif"))) as src:
        centre = (src.bounds.left + 400, src.bounds.top - 800)
    without = [r for r in rows.values() if not r["has_sar"]]
    assert [(r["bounds"][0], r["bounds"][1]) for r in without] == [centre]
    assert all(np.isfinite(r["sar"]).all() for r in rows.values())
