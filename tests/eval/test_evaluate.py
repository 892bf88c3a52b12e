"""evaluate() on the real EuroSAT-MS tiles, checked against independent reads and references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from eval_fixtures import STATS, fake_run  # noqa: F401 (fixture)
from PIL import Image
from sklearn.linear_model import LogisticRegression

from deo.config import build_config
from deo.eval.checkpoint import weights_sha256
from deo.eval.config import EvalConfig
from deo.eval.evaluate import evaluate
from deo.eval.pca_image import figure_size


def _reference_knn_top1(ftr, ytr, fte, yte, k, t=0.07):
    tr = ftr / np.linalg.norm(ftr, axis=1, keepdims=True)
    correct = 0
    for q, y in zip(fte, yte, strict=True):
        sims = tr @ (q / np.linalg.norm(q))
        nn = np.argsort(-sims)[:k]
        votes = np.zeros(10)
        for j in nn:
            votes[ytr[j]] += np.exp(sims[j] / t)
        correct += int(votes.argmax() == y)
    return correct / len(yte)


def test_evaluate_eurosat_with_baselines(shared_data, fake_run, tmp_path):  # noqa: F811
    run, state = fake_run
    cfg = build_config(EvalConfig, overrides=[
        f"checkpoint={run}", f"dataset={shared_data / 'eurosat_ms'}", f"out={tmp_path / 'eval'}",
        "baselines=[random,pixels,teacher]", "l2_grid=[1e-3,1e-1]", "few_shot=[1,5]", "few_shot_trials=1",
        "pca_tiles=3", "quiet=true",
    ])
    report = evaluate(cfg)
    d = report["dataset"]
    assert (d["n_train"], d["n_test"], len(d["classes"])) == (172, 44, 10)
    # 20% of each class (24 -> 5, 20 -> 4, 16 -> 3) is held out
    assert list(d["test_counts"].values()) == [5, 5, 5, 4, 4, 3, 4, 5, 4, 5]
    assert report["checkpoint"]["weights_sha256"] == weights_sha256(state["student"])
    assert set(report["results"]) == {"backbone/ms", "random_init/ms", "pixels/ms", "backbone/optical",
                                      "random_init/optical", "pixels/optical", "teacher/optical"}
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["results"] == json.loads(json.dumps(report["results"]))

    # pixel baseline recomputed from direct rasterio reads: kNN and linear probe agree
    root = shared_data / "eurosat_ms"
    test_names = set(d["test_items"])
    files = sorted(p for c in sorted(d["classes"]) for p in (root / c).glob("*.tif"))
    x, y, is_test = [], [], []
    for f in files:
        with rasterio.open(f) as src:
            a = src.read()[[1, 2, 3, 4, 5, 6, 7, 12, 10, 11]].astype(np.float64)
        a = (a - np.array(STATS["ms"]["mean"])[:, None, None]) / np.array(STATS["ms"]["std"])[:, None, None]
        x.append(np.r_[a.mean((1, 2)), a.std((1, 2))])
        y.append(d["classes"].index(f.parent.name))
        is_test.append(f.name in test_names)
    x, y, is_test = np.array(x), np.array(y), np.array(is_test)
    assert is_test.sum() == 44
    px = report["results"]["pixels/ms"]
    assert px["knn"]["ks"] == [5, 10, 20, 50, 100]
    for k in (5, 20):
        want = _reference_knn_top1(x[~is_test], y[~is_test], x[is_test], y[is_test], k)
        assert px["knn"]["per_k"][str(k)]["top1"] == pytest.approx(want)
    l2 = px["linear"]["l2"]
    mu, sd = x[~is_test].mean(0), x[~is_test].std(0)
    ref = LogisticRegression(C=1 / (l2 * 172), tol=1e-10, max_iter=10000).fit((x[~is_test] - mu) / sd, y[~is_test])
    want = float((ref.predict((x[is_test] - mu) / sd) == y[is_test]).mean())
    assert px["linear"]["top1"] == pytest.approx(want, abs=1 / 44 + 1e-9)  # at most one borderline tile
    assert px["linear"]["top1"] > 0.4  # raw spectra separate EuroSAT classes well above chance (0.1)
    assert set(px["few_shot"]) == {"1", "5"}

    png = tmp_path / "eval" / "pca.png"
    assert report["pca_png"] == str(png)
    assert Image.open(png).size == figure_size(3)


def test_evaluate_rejects_bad_input(shared_data, fake_run):  # noqa: F811
    run, _ = fake_run
    with pytest.raises(ValueError, match="no labelled data"):
        evaluate(build_config(EvalConfig, overrides=[f"checkpoint={run}"]))
    with pytest.raises(ValueError, match="13 bands but s2_band_order lists 12"):
        evaluate(build_config(EvalConfig, overrides=[
            f"checkpoint={run}", f"dataset={shared_data / 'eurosat_ms'}", "s2_band_order=s2_l2a_12", "quiet=true"]))


def test_reports_on_different_sets_go_to_their_own_folders():
    """The default out was <run>/eval for every set: evaluating a second set overwrote the first report."""
    from deo.eval.evaluate import default_out

    ckpt = "runs/default/checkpoint_00000300"
    for over, name in ((["dataset=../shared/data/eurosat_ms/"], "eurosat_ms"),
                       (["dataset=data/samples/eurosat_probe.csv"], "eurosat_probe"),
                       (["train_set=s3://b/sets/train.parquet", "test_set=s3://b/sets/test.parquet"], "train")):
        assert default_out(ckpt, build_config(EvalConfig, overrides=over)) == f"runs/default/eval/{name}"


def test_a_wrong_band_order_is_warned_about_and_reported(shared_data, fake_run, tmp_path):  # noqa: F811
    run, _ = fake_run
    over = [f"checkpoint={run}", f"dataset={shared_data / 'eurosat_ms'}", "branches=[ms]", "few_shot=[]",
            "pca_tiles=0", "l2_grid=[1e-2]", "quiet=true"]
    with pytest.warns(UserWarning, match=r"B8A's mean is 0\.\d\dx B08's .*check s2_band_order=s2_13"):
        report = evaluate(build_config(EvalConfig, overrides=[*over, "s2_band_order=s2_13", f"out={tmp_path / 'w'}"]))
    assert "check s2_band_order=s2_13" in report["dataset"]["warnings"][0]
    report = evaluate(build_config(EvalConfig, overrides=[*over, f"out={tmp_path / 'r'}"]))
    assert report["dataset"]["warnings"] == []
