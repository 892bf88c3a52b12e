"""Probe metrics against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score

from deo.eval.metrics import macro_f1, mean_average_precision, multilabel_f1, top1


def test_single_label_metrics():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 6, 200))  # class 5 is predicted only
    assert top1(p, y) == pytest.approx((p == y).mean())
    assert macro_f1(p, y) == pytest.approx(f1_score(y, p, average="macro"))


def test_multilabel_metrics():
    rng = np.random.default_rng(1)
    y = (rng.random((80, 6)) < 0.3).astype(int)
    y[:, 5] = 0  # a class without positives is left out of mAP
    s = np.round(y * 0.4 + rng.random((80, 6)), 1)  # rounding creates ties
    micro, macro = multilabel_f1(s >= 0.5, y)
    assert micro == pytest.approx(f1_score(y, s >= 0.5, average="micro"))
    assert macro == pytest.approx(f1_score(y, s >= 0.5, average="macro", zero_division=0))
    assert mean_average_precision(s, y) == pytest.approx(average_precision_score(y[:, :5], s[:, :5]))
