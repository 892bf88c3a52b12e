"""pipelines/evaluate.py and pipelines/export.py run as a user runs them."""

from __future__ import annotations

import io
import json

import torch

from deo.bands import DEO_BANDS
from deo.config import to_dict
from deo.io import storage
from deo.models.student import build_student
from deo.train.config import PretrainConfig

from conftest import run_cli
from tests_helpers import REPO

STATS = {"ms": {"mean": [1500.0] * 10, "std": [600.0] * 10}, "optical": {"mean": [100.0] * 3, "std": [50.0] * 3}}


def _run(tmp_path) -> str:
    cfg = PretrainConfig()
    torch.manual_seed(0)
    state = {"student": build_student(cfg.model, img_size=64).state_dict(), "config": to_dict(cfg), "step": 4,
             "stats": STATS, "bands": DEO_BANDS}
    buf = io.BytesIO()
    torch.save(state, buf)
    run = str(tmp_path / "runs" / "default")
    storage.write_bytes(f"{run}/checkpoint_00000004/state.pt", buf.getvalue())
    return run


def test_export_then_evaluate_cli(shared_data, tmp_path):
    run = _run(tmp_path)
    r = run_cli(["pipelines/export.py", f"checkpoint={run}"])
    assert r.returncode == 0, r.stderr
    assert f"exported     {run}/backbone.safetensors" in r.stdout
    summary = json.loads((tmp_path / "runs/default/backbone.summary.json").read_text())  # DESIGN: every pipeline
    assert summary["backbone"] == f"{run}/backbone.safetensors" and summary["step"] == 4
    assert summary["source"] == f"{run}/checkpoint_00000004" and len(summary["weights_sha256"]) == 64

    r = run_cli(["pipelines/evaluate.py", f"checkpoint={run}/backbone.safetensors",
                 f"dataset={shared_data / 'eurosat_ms'}", f"out={tmp_path / 'ev'}", "branches=[ms]",
                 "few_shot=[]", "pca_tiles=0", "l2_grid=[1e-2]", "quiet=true"])
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    row = report["results"]["backbone/ms"]
    avg = row["knn"]["knn_avg"]
    assert avg == sum(m["top1"] for m in row["knn"]["per_k"].values()) / 5
    assert f"backbone/ms    {100 * avg:.1f}" in r.stdout  # the printed table carries the report's numbers
    assert "kNN k used: [5, 10, 20, 50, 100]" in r.stdout
    assert report["checkpoint"]["step"] == 4 and report["pca_png"] is None


def test_evaluate_cli_bad_input_exits_nonzero(tmp_path):
    r = run_cli(["pipelines/evaluate.py", f"checkpoint={tmp_path / 'missing'}", "dataset=x"])
    assert r.returncode != 0 and "not found" in r.stderr
    r = run_cli(["pipelines/evaluate.py", "baselines=[nope]"])
    assert r.returncode != 0 and "baselines must be among" in r.stderr
    # damaged exports: named, with what was expected, not a JSON error or a safetensors traceback
    good = tmp_path / "b.safetensors"
    assert run_cli(["pipelines/export.py", f"checkpoint={_run(tmp_path)}", f"out={good}"]).returncode == 0
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-1000])
    (tmp_path / "text.safetensors").write_text("not weights")
    for name, expected in (("cut", "is not a whole safetensors file"), ("text", "is not a safetensors file")):
        r = run_cli(["pipelines/evaluate.py", f"checkpoint={tmp_path / name}.safetensors", "dataset=x"])
        assert r.returncode == 2 and f"error: '{tmp_path / name}.safetensors' {expected}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    r = run_cli(["pipelines/evaluate.py", "--help"])
    assert r.returncode == 0 and "s2_band_order" in r.stdout and "train_set" in r.stdout


def test_evaluate_cli_on_separate_train_and_test_sets(tmp_path):
    """The docstring's second form: train_set= test_set= take the place of the default config's dataset."""
    run = _run(tmp_path)
    rows = (REPO / "data/samples/eurosat_probe.csv").read_text().splitlines()[1:]
    tiles = REPO / "data/samples"
    for name, part in (("train", rows[0::4] + rows[1::4] + rows[2::4]), ("test", rows[3::4])):
        (tmp_path / f"{name}.csv").write_text("path,label\n" + "\n".join(f"{tiles}/{r}" for r in part) + "\n")
    r = run_cli(["pipelines/evaluate.py", f"checkpoint={run}", f"train_set={tmp_path / 'train.csv'}",
                 f"test_set={tmp_path / 'test.csv'}", "s2_band_order=eurosat", "branches=[ms]", "few_shot=[]",
                 "pca_tiles=0", "l2_grid=[1e-2]", "quiet=true"])
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "runs/default/eval/train/report.json").read_text())
    assert report["dataset"]["n_train"] == 30 and report["dataset"]["n_test"] == 10, report["dataset"]
    assert report["config"]["dataset"] == "" and report["config"]["train_set"] == str(tmp_path / "train.csv")
