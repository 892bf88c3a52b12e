"""Ingest runs: bad inputs recorded, idempotent and resumable reruns, S3 in and out, Ray Data = plain loop."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from deo.config import build_config, read_yaml
from deo.ingest.config import IngestConfig
from deo.ingest.run import PARTS, _even_groups, failure_lines, ingest
from deo.io import storage
from deo.io.shards import ShardDataset

from tests_helpers import REPO

L2A = "s2_l2a_tile/sentinel-s2-l2a-cogs/29/R/KH/2020/2/S2A_29RKH_20200219_0_L2A"
DEO_FILES = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12", "SCL")


def cfg_for(out: str, s2: list[str], aerial: list[str] | None = None, **over: object) -> IngestConfig:
    args = [f"s2=[{','.join(s2)}]", f"aerial=[{','.join(aerial or [])}]", f"output={out}",
            "use_ray=false"] + [f"{k}={v}" for k, v in over.items()]
    return build_config(IngestConfig, overrides=args)


def ids(out: str) -> list[str]:
    ds = ShardDataset.open(out)
    return [s for b in ds.iter_batches(columns=["sample_id"]) for s in b["sample_id"]]


def test_bad_inputs_are_recorded_and_the_run_goes_on(tmp_path, shared_data):
    good = tmp_path / "in" / "good"
    shutil.copytree(shared_data / "eurosat_ms" / "SeaLake", good)
    bad = tmp_path / "in" / "bad"
    bad.mkdir()
    eurosat = sorted(good.glob("*.tif"))[0].read_bytes()
    (bad / "truncated.tif").write_bytes(eurosat[: len(eurosat) // 2])
    (bad / "garbage.tif").write_bytes(b"not a tiff at all" * 100)
    # a per-band scene whose B05 is cut short, and one that lacks B11
    scene = tmp_path / "in" / "scene_trunc"
    scene.mkdir()
    for b in DEO_FILES:
        shutil.copy(shared_data / L2A / f"{b}.tif", scene)
    data = (scene / "B05.tif").read_bytes()
    (scene / "B05.tif").write_bytes(data[: len(data) // 3])
    lacking = tmp_path / "in" / "scene_lacking"
    shutil.copytree(scene, lacking)
    (lacking / "B11.tif").unlink()
    shutil.copy(shared_data / L2A / "B05.tif", lacking)
    # 13-band file read with a 12-band order: wrong band count
    wrong = tmp_path / "in" / "wrong"
    wrong.mkdir()
    shutil.copy(sorted(good.glob("*.tif"))[1], wrong / "x.tif")
    missing = str(tmp_path / "in" / "nope")
    out = str(tmp_path / "out")
    cfg = cfg_for(out, [str(good), str(bad), str(scene), str(lacking), missing], s2_band_order="eurosat")
    summary = ingest(cfg, log=lambda _: None)
    assert summary["counts"]["ms"] == len(list(good.glob("*.tif")))
    sources = {s["uri"]: s for s in ShardDataset.open(out).manifest["sources"]}
    assert sources[str(bad / "truncated.tif")]["status"] == "failed"
    assert "truncated" in sources[str(bad / "truncated.tif")]["reason"]
    # GDAL's reason, not only rasterio's "Read failed. See previous exception for details."
    assert "TIFFReadEncodedStrip() failed" in sources[str(bad / "truncated.tif")]["reason"]
    assert "unreadable" in sources[str(bad / "garbage.tif")]["reason"]
    assert sources[str(scene)]["status"] == "failed" and "B05" in sources[str(scene)]["reason"]
    assert "missing bands B11" in sources[str(lacking)]["reason"]
    assert sources[missing]["status"] == "failed" and "missing" in sources[missing]["reason"]
    # wrong band count and unknown band order
    cfg = cfg_for(str(tmp_path / "out2"), [str(wrong)], s2_band_order="s2_l2a_12")
    ingest(cfg, log=lambda _: None)
    (entry,) = ShardDataset.open(str(tmp_path / "out2")).manifest["sources"]
    assert "wrong band count" in entry["reason"] and "13 bands, expected 12" in entry["reason"]
    cfg = cfg_for(str(tmp_path / "out3"), [str(wrong)])
    summary = ingest(cfg, log=lambda _: None)
    (entry,) = ShardDataset.open(str(tmp_path / "out3")).manifest["sources"]
    assert entry["status"] == "failed" and "unknown band order" in entry["reason"]
    assert summary["counts"]["rows"] == 0
    # the shipped default config assumes no band order either: a user's own undescribed stacks fail
    # clearly instead of being read in the committed samples' order
    shipped = read_yaml(REPO / "configs/ingest/default.yaml")
    assert "s2_band_order" not in shipped
    cfg = build_config(IngestConfig, shipped, [f"s2=[{wrong}]", "aerial=[]", f"output={tmp_path / 'out4'}",
                                               "use_ray=false"])
    ingest(cfg, log=lambda _: None)
    (entry,) = ShardDataset.open(str(tmp_path / "out4")).manifest["sources"]
    assert entry["status"] == "failed" and "set s2_band_order" in entry["reason"]


def test_rerun_is_idempotent_resumes_and_drops_stale_files(tmp_path, shared_data):
    out = str(tmp_path / "out")
    files = [str(f) for f in sorted((shared_data / "eurosat_ms" / "Pasture").glob("*.tif"))]
    cfg = cfg_for(out, files, s2_band_order="eurosat", rows_per_file=5)
    ingest(cfg, log=lambda _: None)
    first = ids(out)
    parquet = sorted(Path(out).glob("*.parquet"))
    assert len(first) == len(set(first)) == len(files) and len(parquet) == -(-len(files) // 5)
    ingest(cfg, log=lambda _: None)
    assert ids(out) == first and sorted(Path(out).glob("*.parquet")) == parquet
    # interrupted run: one shard and its summary lost; the rerun redoes only that one
    parquet[0].unlink()
    (Path(out) / PARTS / (parquet[0].stem + ".json")).unlink()
    summary = ingest(cfg, log=lambda _: None)
    assert ids(out) == first and summary["counts"]["rows"] == len(files)
    # another plan (tile size) replaces the files instead of adding to them
    cfg2 = cfg_for(out, files, s2_band_order="eurosat", rows_per_file=5, **{"tile.ms_px": 32})
    ingest(cfg2, log=lambda _: None)
    second = ids(out)
    assert len(second) == 4 * len(files) and not set(second) & set(first)
    assert len(list(Path(out).glob("*.parquet"))) == -(-4 * len(files) // 4)


def test_ingest_into_a_parent_folder_keeps_the_datasets_in_its_sub_folders(tmp_path, shared_data):
    files = [str(f) for f in sorted((shared_data / "eurosat_ms" / "Pasture").glob("*.tif"))]
    child = str(tmp_path / "shards" / "pasture")
    ingest(cfg_for(child, files[:4], s2_band_order="eurosat"), log=lambda _: None)
    before = ids(child)
    ingest(cfg_for(str(tmp_path / "shards"), files[4:8], s2_band_order="eurosat"), log=lambda _: None)
    assert ids(child) == before and ids(str(tmp_path / "shards")) != before
    assert ShardDataset.open(str(tmp_path / "shards")).files == sorted(
        str(p) for p in (tmp_path / "shards").glob("*.parquet"))


def test_shard_jobs_are_even_and_hold_at_most_rows_per_file():
    # a full 10980 px tile at 256 px: 11 x 11 windows of up to 4 x 4 tiles, the last row and column 2 wide
    full = [min(4, 42 - 4 * wx) * min(4, 42 - 4 * wy) for wy in range(11) for wx in range(11)]
    totals = _group_totals(full, _even_groups(full, 512))
    assert sum(totals) == 1764 and len(totals) == 4  # the fewest files of <= 512 tiles
    assert max(totals) <= 1764 / 4 + 16  # within a window of an even share; filling first gave 504 x 3 + 252
    assert _even_groups([17, 23, 48, 4], 51) == [2, 1, 1] and _even_groups([100, 1, 1], 10) == [1, 2]
    rng = np.random.default_rng(0)
    for _ in range(300):
        tiles = rng.integers(1, 20, rng.integers(1, 60)).tolist()
        limit = int(rng.integers(1, 100))
        sizes = _even_groups(tiles, limit)
        assert sum(sizes) == len(tiles) and min(sizes) >= 1
        for total, size in zip(_group_totals(tiles, sizes), sizes, strict=True):
            assert total <= limit or size == 1
        # the fewest groups: filling each group in order up to the limit makes no fewer
        fill, total = 1, 0
        for n in tiles:
            if total and total + n > limit:
                fill, total = fill + 1, 0
            total += n
        assert len(sizes) == fill


def _group_totals(tiles: list[int], sizes: list[int]) -> list[int]:
    starts = np.cumsum([0, *sizes])
    return [sum(tiles[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def test_adding_a_source_keeps_the_other_sources_jobs():
    """A resumed ingest whose inputs grew (or lost a source to a failed probe) keeps the finished files of
    the other sources: each scene is split on its own, and small sources fill jobs in order."""
    from deo.ingest.run import plan_jobs

    def scene(i, tiles_x=42, tiles_y=42):
        return {"kind": "s2_bands", "key": f"s{i}", "uri": f"scene{i}", "tiles_x": tiles_x, "tiles_y": tiles_y,
                "bounds": (0, 0, 1, 1)}

    cfg = build_config(IngestConfig, overrides=["rows_per_file=512", "pair=false", "aerial=[]"])
    plans = [scene(0), scene(1, 1, 1), scene(2), scene(3, 2, 2)]
    names = {j["name"] for j in plan_jobs(plans, cfg)}
    assert len(names) == 4 + 1 + 4  # two scenes of 4 even jobs, and one shared job of the two small ones
    grown = {j["name"] for j in plan_jobs([*plans[:2], scene(9), *plans[2:]], cfg)}
    assert names <= grown and len(grown - names) == 4
    lost = {j["name"] for j in plan_jobs([plans[0], *plans[2:]], cfg)}
    assert len(names - lost) == 1  # only the shared job that held the lost small source


@pytest.mark.ray
def test_ray_data_from_s3_equals_plain_loop_locally(tmp_path, shared_data, s3_server, s3_bucket, ray_local):
    local_in = tmp_path / "in"
    shutil.copytree(shared_data / "s2_baselines", local_in / "baselines")
    for b in (*DEO_FILES, "S2A_29RKH_20200219_0_L2A.json"):
        (local_in / "l2a").mkdir(exist_ok=True)
        shutil.copy(shared_data / L2A / b if "." in b else shared_data / L2A / f"{b}.tif", local_in / "l2a")
    shutil.copy(shared_data / "naip" / "m_3607824_se_17_1_20160620_subset.tif", local_in / "naip.tif")
    remote_in = s3_server.upload_dir(local_in, s3_bucket + "/in")
    over = {"s2_band_order": "s2_13", "tile.ms_px": 4 * 16, "max_nodata": 1.0}
    plain = cfg_for(str(tmp_path / "plain"), [str(local_in / "l2a"), str(local_in / "baselines")],
                    [str(local_in / "naip.tif")], **over)
    ingest(plain, log=lambda _: None)
    remote_out = s3_bucket + "/shards"
    cfg = cfg_for(remote_out, [remote_in + "/l2a", remote_in + "/baselines"], [remote_in + "/naip.tif"],
                  **over)
    cfg.use_ray = True
    summary = ingest(cfg, log=lambda _: None)
    assert summary["mode"] == "ray" and summary["counts"]["rows"] > 100
    a, b = ShardDataset.open(str(tmp_path / "plain")), ShardDataset.open(remote_out)
    assert b.manifest["counts"] == a.manifest["counts"]
    for mod in ("ms", "optical"):
        for k in ("mean", "std"):
            np.testing.assert_allclose(b.manifest["stats"][mod][k], a.manifest["stats"][mod][k], rtol=1e-9)
    offsets = {s["uri"].rsplit("/", 1)[-1]: s.get("offset") for s in b.manifest["sources"]}
    assert offsets["S2B_MSIL1C_20220615T101559_N0400_R065_T32UPC_20220615T122549.tif"] == 1000

    def by_place(ds: ShardDataset) -> dict[tuple, np.ndarray]:
        out = {}
        for batch in ds.iter_batches():
            for i in range(len(batch["sample_id"])):
                key = (tuple(batch["bounds"][i]), batch["has_ms"][i])
                out[key] = batch["ms"][i] if batch["has_ms"][i] else batch["optical"][i]
        return out

    pa_, pb = by_place(a), by_place(b)
    assert pa_.keys() == pb.keys()
    for k in pa_:
        np.testing.assert_array_equal(pa_[k], pb[k])
    assert storage.exists(remote_out + "/summary.json")


def test_failures_of_one_kind_are_printed_a_few_times_then_counted():
    """216 EuroSAT stacks without s2_band_order printed 216 identical lines before the final error."""
    unknown = [{"uri": f"s3://b/{i}.tif", "reason": f"unknown band order: s3://b/{i}.tif has 13 bands"} for i in range(5)]
    cut = [{"uri": "x.tif", "reason": "read failed at window (0, 0): x.tif: truncated"}]
    lines = failure_lines(unknown + cut)
    assert lines == [*(f"failed: s3://b/{i}.tif: unknown band order: s3://b/{i}.tif has 13 bands" for i in range(3)),
                     "failed: 2 more sources alike: unknown band order: <file> has 13 bands",
                     "failed: x.tif: read failed at window (0, 0): x.tif: truncated"]
    assert failure_lines(unknown[:3]) == [f"failed: s3://b/{i}.tif: {unknown[i]['reason']}" for i in range(3)]


def test_a_wrong_band_order_preset_is_warned_about(tmp_path, shared_data):
    """EuroSAT stacks (B8A last) read with the s2_13 preset (B8A after B08) gave 10 scrambled bands and
    rc 0: the NIR pair B08/B8A is the sign (0.31 against about 1.1)."""
    forest = str(shared_data / "eurosat_ms" / "Forest")
    lines = []
    wrong = ingest(cfg_for(str(tmp_path / "wrong"), [forest], s2_band_order="s2_13"), log=lines.append)
    assert len(wrong["warnings"]) == 1 and "check s2_band_order=s2_13" in wrong["warnings"][0]
    assert f"[ingest] warning: {wrong['warnings'][0]}" in lines
    assert wrong["counts"]["rows"] > 0  # a warning: the data may be odd, not necessarily wrong
    right = ingest(cfg_for(str(tmp_path / "right"), [forest], s2_band_order="eurosat"), log=lambda _: None)
    assert right["warnings"] == []


def test_band_order_warning_judges_only_sets_bright_enough_in_the_nir():
    from deo.bands import band_order_warning

    means = [1000.0] * 10
    means[6], means[7] = 2300.0, 2592.0  # B08, B8A of EuroSAT-MS read right
    assert band_order_warning(means, "x") is None
    means[7] = 720.0
    assert band_order_warning(means, "s2_band_order=s2_13").startswith("B8A's mean is 0.31x B08's (720 vs 2300)")
    means[6], means[7] = 120.0, 60.0  # open water: too dark to judge
    assert band_order_warning(means, "x") is None
    assert band_order_warning([None] * 10, "x") is None  # nothing ingested
