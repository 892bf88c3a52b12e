"""pipelines/ingest.py as users run it: default samples, exit codes, summary JSON."""

from __future__ import annotations

import json
import shutil

import pytest

from deo.io.shards import ShardDataset

from conftest import run_cli


@pytest.mark.ray
def test_default_run_ingests_the_committed_samples_with_ray(tmp_path):
    out = tmp_path / "shards"
    res = run_cli(["pipelines/ingest.py", f"output={out}"])
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "ray" and summary["counts"]["ms"] >= 150
    assert "tiles/s" in res.stdout and "rejected" in res.stdout
    ds = ShardDataset.open(str(out))
    statuses = {s["uri"].rsplit("/", 1)[-1]: s["status"] for s in ds.manifest["sources"]}
    assert statuses["S2B_MSIL1C_20220615T101559_N0400_R065_T32UPC_20220615T122549.tif"] == "skipped"
    assert ds.manifest["counts"]["ms"] == summary["counts"]["ms"]


def test_exit_codes(tmp_path, shared_data):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.tif").write_bytes(b"\x00" * 1000)
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(sorted((shared_data / "eurosat_ms" / "River").glob("*.tif"))[0], good)
    common = ["use_ray=false", "aerial=[]", "s2_band_order=eurosat"]
    res = run_cli(["pipelines/ingest.py", f"s2=[{bad}]", f"output={tmp_path / 'o1'}", *common])
    assert res.returncode == 1 and "nothing was ingested" in res.stderr and "broken.tif" in res.stderr
    res = run_cli(["pipelines/ingest.py", f"s2=[{bad},{good}]", f"output={tmp_path / 'o2'}", *common])
    assert res.returncode == 0, res.stderr
    res = run_cli(["pipelines/ingest.py", f"s2=[{bad},{good}]", f"output={tmp_path / 'o3'}", "strict=true",
                   *common])
    assert res.returncode == 1 and "strict=true and 1 inputs failed" in res.stderr
    res = run_cli(["pipelines/ingest.py", "tile.ms_pix=3"])
    assert res.returncode == 2 and "tile.ms_px" in res.stderr
    res = run_cli(["pipelines/ingest.py", "s2_band_order=B02,B99"])
    assert res.returncode == 2 and "B99" in res.stderr
    res = run_cli(["pipelines/ingest.py", "--help"])
    assert res.returncode == 0 and "tile.optical_px" in res.stdout and "max_cloud" in res.stdout
