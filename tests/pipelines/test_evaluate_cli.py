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
    r = run_cli(["pipelines/evaluate.py", "--help"])
    assert r.returncode == 0 and "s2_band_order" in r.stdout and "train_set" in r.stdout
