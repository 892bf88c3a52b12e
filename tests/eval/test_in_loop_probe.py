"""In-loop kNN probe on real EuroSAT-MS tiles with the real tiny student."""

from __future__ import annotations

import pytest
import torch
from eval_fixtures import STATS

from deo.eval.features import student_features
from deo.eval.in_loop_probe import KnnProbe, build_knn_probe
from deo.eval.knn import knn_evaluate
from deo.models.student import build_student
from deo.train.config import ModelConfig, ProbeConfig


def test_knn_probe_matches_direct_knn(shared_data):
    probe = KnnProbe(str(shared_data / "eurosat_ms"), STATS, max_samples=100, seed=1)
    # the cap keeps round(n_c * 100 / 216) tiles of each class (24, 20 and 16 tiles per class)
    counts = [24, 24, 24, 20, 20, 16, 20, 24, 20, 24]
    assert len(probe.train_idx) + len(probe.test_idx) == sum(round(n * 100 / 216) for n in counts) == 98
    torch.manual_seed(0)
    student = build_student(ModelConfig(), img_size=64).train()
    out = probe(student, "cpu")
    assert student.training  # mode restored
    feats = student_features(student, probe.images, "ms", STATS["ms"])
    ref = knn_evaluate(feats[probe.train_idx], probe.labels[probe.train_idx], feats[probe.test_idx],
                       probe.labels[probe.test_idx], 10)
    assert out["probe/knn_avg"] == pytest.approx(ref["knn_avg"])
    assert set(out) == {"probe/knn_avg"} | {f"probe/knn_k{k}" for k in ref["ks"]}
    assert out["probe/knn_k5"] == pytest.approx(ref["per_k"]["5"]["top1"])


def test_build_knn_probe_off_and_misconfigured():
    assert build_knn_probe(ProbeConfig(every=0), STATS) is None
    with pytest.raises(ValueError, match="needs probe.dataset"):
        build_knn_probe(ProbeConfig(every=10, dataset=""), STATS)
