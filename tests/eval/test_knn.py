"""kNN probe against a plain per-sample loop (numpy, float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deo.eval.knn import knn_evaluate, knn_ks, knn_scores


def _reference_votes(train, labels, test, k, t, num_classes):
    out = np.zeros((len(test), num_classes))
    tr = train / np.linalg.norm(train, axis=1, keepdims=True)
    for i, q in enumerate(test):
        q = q / np.linalg.norm(q)
        sims = [float(q @ x) for x in tr]
        nn = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        for j in nn:
            out[i] += math.exp(sims[j] / t) * labels[j]
    return out


@pytest.fixture
def feats():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(60, 8, generator=g)
    test = torch.randn(25, 8, generator=g)
    y_train = torch.randint(0, 4, (60,), generator=g)
    y_test = torch.randint(0, 4, (25,), generator=g)
    return train, y_train, test, y_test


def test_knn_scores_equal_reference_loop(feats):
    train, y_train, test, _ = feats
    onehot = np.eye(4)[y_train.numpy()]
    for k in (1, 5, 20):
        got = knn_scores(train, torch.from_numpy(onehot), test, k, 0.07, chunk=7).double().numpy()
        ref = _reference_votes(train.double().numpy(), onehot, test.double().numpy(), k, 0.07, 4)
        np.testing.assert_allclose(got, ref, rtol=2e-4)


def test_knn_evaluate_accuracy_and_average(feats):
    train, y_train, test, y_test = feats
    res = knn_evaluate(train, y_train, test, y_test, num_classes=4)
    assert res["ks"] == [5, 10, 20, 50]  # 100 and 200 are not below the 60 training samples
    onehot = np.eye(4)[y_train.numpy()]
    accs = []
    for k in res["ks"]:
        ref = _reference_votes(train.double().numpy(), onehot, test.double().numpy(), k, 0.07, 4)
        acc = float((ref.argmax(1) == y_test.numpy()).mean())
        assert res["per_k"][str(k)]["top1"] == pytest.approx(acc)
        accs.append(acc)
    assert res["knn_avg"] == pytest.approx(sum(accs) / len(accs))


def test_knn_separable_clusters_are_perfect():
    centres = torch.eye(3) * 10
    g = torch.Generator().manual_seed(1)
    y = torch.arange(3).repeat(30)
    x = centres[y] + 0.1 * torch.randn(90, 3, generator=g)
    res = knn_evaluate(x[:60], y[:60], x[60:], y[60:], 3, ks=(5, 10))
    assert res["knn_avg"] == 1.0


def test_knn_multilabel_scores_are_vote_fractions(feats):
    train, _, test, _ = feats
    g = torch.Generator().manual_seed(2)
    y_train = (torch.rand(60, 5, generator=g) > 0.6).float()
    y_test = (torch.rand(25, 5, generator=g) > 0.6).float()
    y_test[0] = 1  # every class has a positive
    res = knn_evaluate(train, y_train, test, y_test, 5, ks=(10,))
    from sklearn.metrics import average_precision_score

    ref = _reference_votes(train.double().numpy(), y_train.numpy(), test.double().numpy(), 10, 0.07, 5)
    ref = ref / _reference_votes(train.double().numpy(), np.ones((60, 1)), test.double().numpy(), 10, 0.07, 1)
    want = average_precision_score(y_test.numpy(), np.round(ref, 6), average="macro")
    assert res["metric"] == "map"
    assert res["per_k"]["10"]["map"] == pytest.approx(want, abs=1e-6)


def test_knn_ks_clipping():
    assert knn_ks(1000) == [5, 10, 20, 50, 100, 200]
    assert knn_ks(172) == [5, 10, 20, 50, 100]
    assert knn_ks(3) == [3]
    with pytest.raises(ValueError, match="at least one"):
        knn_ks(0)
