"""Ingest jobs: resume when a shard file went missing, remove_stale's scope, scene splitting at the limit,
and a failed window ending its source's part of the job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from deo.bands import DEO_BANDS
from deo.config import build_config
from deo.ingest import run as ingest_run
from deo.ingest.config import IngestConfig
from deo.ingest.run import PARTS, ingest, plan_jobs, run_job
from deo.io.raster import RasterCache
from deo.io.shards import ShardDataset


def write_scene(folder: Path, h: int = 8, w: int = 8) -> Path:
    folder.mkdir(parents=True)
    prof = dict(driver="GTiff", width=w, height=h, count=1, dtype="uint16", crs="EPSG:32632",
                transform=Affine(10, 0, 500000, 0, -10, 5200000))
    for b in DEO_BANDS:
        with rasterio.open(folder / f"{b}.tif", "w", **prof) as dst:
            dst.write(np.full((h, w), 1000, np.uint16), 1)
    return folder


def cfg(out: Path, scene: Path, *over: str) -> IngestConfig:
    return build_config(IngestConfig, overrides=[f"s2=[{scene}]", "aerial=[]", "sar=[]", f"output={out}",
                                                 "use_ray=false", "tile.ms_px=4", *over])


def ids(out: Path) -> list[str]:
    return sorted(s for b in ShardDataset.open(str(out)).iter_batches(columns=["sample_id"]) for s in b["sample_id"])


def test_job_whose_shard_file_is_gone_is_redone_though_its_summary_exists(tmp_path):
    scene, out = write_scene(tmp_path / "s"), tmp_path / "out"
    c = cfg(out, scene)
    ingest(c, log=lambda _: None)
    first = ids(out)
    (shard,) = out.glob("*.parquet")
    assert (out / PARTS / (shard.stem + ".json")).exists()
    shard.unlink()  # the summary stays: the job is not complete without its rows
    summary = ingest(c, log=lambda _: None)
    assert shard.exists() and ids(out) == first and summary["counts"]["rows"] == 4


def test_remove_stale_deletes_only_other_plans_part_files(tmp_path):
    scene, out = write_scene(tmp_path / "s"), tmp_path / "out"
    ingest(cfg(out, scene), log=lambda _: None)
    (old,) = out.glob("part-*.parquet")
    mine = [out / "labels.parquet", out / PARTS / "notes.json"]
    for p in mine:
        p.write_bytes(b"not ours")
    ingest(cfg(out, scene, "tile.ms_px=2"), log=lambda _: None)  # another plan
    assert not old.exists() and not (out / PARTS / (old.stem + ".json")).exists()
    assert all(p.read_bytes() == b"not ours" for p in mine)


def test_a_source_of_exactly_rows_per_file_tiles_is_split_on_its_own():
    def plan(key, tiles_x, tiles_y):
        return {"kind": "s2_bands", "key": key, "uri": key, "tiles_x": tiles_x, "tiles_y": tiles_y,
                "bounds": (0, 0, 1, 1)}

    c = build_config(IngestConfig, overrides=["rows_per_file=16", "tile.window_tiles=4", "pair=false", "aerial=[]"])
    # a 1-tile patch, then a scene of two 8-tile windows: 16 tiles, exactly rows_per_file
    jobs = plan_jobs([plan("small", 1, 1), plan("scene", 8, 2)], c)
    units = sorted([(u["plan"]["key"], [tuple(w) for w in u["windows"]]) for u in j["units"]] for j in jobs)
    assert units == [[("scene", [(0, 0), (1, 0)])], [("small", [(0, 0)])]]


def test_a_failed_window_skips_the_rest_of_its_source_in_the_job(tmp_path, monkeypatch):
    calls = []

    def window_rows(self, plan, wx, wy, pairs, sars=None):
        calls.append((wx, wy))
        if (wx, wy) == (1, 0):
            raise OSError("boom")
        return [], {"nodata": 0, "cloud": 0}

    monkeypatch.setattr(ingest_run.TileMaker, "window_rows", window_rows)
    c = build_config(IngestConfig, overrides=[f"output={tmp_path / 'out'}", "aerial=[]", "s2=[]", "use_ray=false"])
    plan = {"key": "k", "uri": "scene"}
    job = {"name": "part-test", "units": [{"plan": plan, "windows": [(0, 0), (1, 0), (2, 0), (3, 0)],
                                           "pairs": [], "sars": []}]}
    cache = RasterCache()
    try:
        summary = run_job(job, c, cache)
    finally:
        cache.close()
    assert calls == [(0, 0), (1, 0)]
    assert summary["sources"]["k"]["error"].startswith("read failed at window (1, 0)")


def test_inputs_that_match_nothing_fail_without_starting_ray(tmp_path, monkeypatch):
    """A mistyped input path used to cost a Ray start (10-15 s on 2 cores) before ingest found nothing."""
    from deo.ingest import ray_data

    def no_ray(*_args, **_kwargs):
        raise AssertionError("Ray was started for an ingest with nothing to read")

    monkeypatch.setattr(ray_data, "start_or_join", no_ray)
    cfg = build_config(IngestConfig, overrides=[f"s2=[{tmp_path / 'no_such_folder'}]", "aerial=[]", "use_ray=true",
                                                f"output={tmp_path / 'out'}"])
    summary = ingest(cfg, log=lambda _: None)
    assert summary["counts"]["rows"] == 0 and summary["sources"]["failed"] == 1  # recorded as missing
