"""Linear probe against scikit-learn's LogisticRegression with the same objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from deo.eval.linear_probe import few_shot_evaluate, fit_logistic, linear_probe_evaluate, select_l2
from deo.eval.splits import sample_per_class, stratified_split


def _data(seed=0, n=120, d=6, c=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(c).repeat(n // c)
    x = torch.randn(n, d, generator=g) * 3 + 5 + y[:, None].float() * torch.linspace(0, 1, d)
    return x, y


def test_fit_logistic_equals_sklearn_multinomial():
    x, y = _data()
    l2 = 1e-2
    model = fit_logistic(x, y, 3, l2)
    z = ((x - x.mean(0)) / x.std(0, unbiased=False)).double().numpy()
    ref = LogisticRegression(C=1 / (l2 * len(x)), tol=1e-10, max_iter=10000).fit(z, y.numpy())
    np.testing.assert_allclose(model.scores(x).numpy(), ref.predict_proba(z), atol=1e-5)
    # softmax logits are defined up to a per-sample constant; sklearn centres W over classes too
    np.testing.assert_allclose(model.weight.numpy() - model.weight.numpy().mean(0), ref.coef_, atol=1e-4)


def test_fit_logistic_equals_sklearn_per_class_sigmoid():
    x, _ = _data(1)
    g = torch.Generator().manual_seed(3)
    y = (x[:, :4] + torch.randn(120, 4, generator=g) * 2 > 5).float()
    l2 = 1e-2
    model = fit_logistic(x, y, 4, l2)
    z = ((x - x.mean(0)) / x.std(0, unbiased=False)).double().numpy()
    for c in range(4):
        ref = LogisticRegression(C=1 / (l2 * len(x)), tol=1e-10, max_iter=10000).fit(z, y[:, c].numpy())
        np.testing.assert_allclose(model.scores(x)[:, c].numpy(), ref.predict_proba(z)[:, 1], atol=1e-5)


def test_linear_probe_evaluate_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    x, y = _data(2, n=150)
    tr, te = stratified_split(y.numpy(), 0.3, seed=0)
    res = linear_probe_evaluate(x[tr], y[tr], x[te], y[te], 3, l2_grid=(1e-3,), seed=0)
    z_mean, z_std = x[tr].mean(0), x[tr].std(0, unbiased=False)
    ref = LogisticRegression(C=1 / (1e-3 * len(tr)), tol=1e-10, max_iter=10000)
    ref.fit(((x[tr] - z_mean) / z_std).numpy(), y[tr].numpy())
    pred = ref.predict(((x[te] - z_mean) / z_std).numpy())
    assert res["l2"] == 1e-3
    assert res["top1"] == pytest.approx(accuracy_score(y[te].numpy(), pred))
    assert res["macro_f1"] == pytest.approx(f1_score(y[te].numpy(), pred, average="macro"))
    assert res["top1"] > 0.5  # the classes are shifted apart: well above chance (1/3)


def test_linear_probe_is_seeded():
    x, y = _data(4, n=90)
    a = linear_probe_evaluate(x[:60], y[:60], x[60:], y[60:], 3, seed=7)
    b = linear_probe_evaluate(x[:60], y[:60], x[60:], y[60:], 3, seed=7)
    assert a == b
    assert set(a["val"]) == {repr(v) for v in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)}


def test_few_shot_uses_n_per_class():
    x, y = _data(5, n=90)
    res = few_shot_evaluate(x[:60], y[:60], x[60:], y[60:], 3, l2=1e-2, shots=(1, 5), trials=2, seed=0)
    assert set(res) == {"1", "5"} and res["5"]["trials"] == 2
    idx = torch.from_numpy(sample_per_class(y[:60].numpy(), 5, 0))
    assert np.bincount(y[:60][idx].numpy()).tolist() == [5, 5, 5]
    accs = []
    for t in range(2):
        i = torch.from_numpy(sample_per_class(y[:60].numpy(), 5, t))
        m = fit_logistic(x[:60][i], y[:60][i], 3, 1e-2)
        accs.append(float((m.scores(x[60:]).argmax(1) == y[60:]).float().mean()))
    assert res["5"]["top1"] == pytest.approx(np.mean(accs))
    # a size the smallest class cannot fill is skipped, not reported as a fewer-shot result
    few = (y[:60] != 2) | (torch.arange(60) < 24)  # class 2 keeps only its draws among the first 24
    smallest = int(np.bincount(y[:60][few].numpy()).min())
    res = few_shot_evaluate(x[:60][few], y[:60][few], x[60:], y[60:], 3, l2=1e-2, shots=(smallest, smallest + 1),
                            trials=1)
    assert "top1" in res[str(smallest)] and "fewer than" in res[str(smallest + 1)]["skipped"]


def test_stratified_split_keeps_class_fractions():
    y = np.repeat(np.arange(4), [10, 20, 5, 1])
    tr, te = stratified_split(y, 0.2, seed=3)
    assert np.bincount(y[te], minlength=4).tolist() == [2, 4, 1, 0]
    assert sorted(np.r_[tr, te].tolist()) == list(range(len(y)))
    assert np.array_equal(stratified_split(y, 0.2, seed=3)[1], te)
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(y, 1.5, 0)


def test_select_l2_picks_the_best_validation_score():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(20)
    x = torch.randn(60, 40, generator=g)
    x[:, 0] += 1.5 * y  # one informative dimension among 40 noisy ones
    l2, val = select_l2(x, y, 3, (1e-5, 1e-3, 1e-1, 1e1), seed=0)
    assert len(set(val.values())) > 1  # the grid matters here
    assert val[repr(l2)] == max(val.values())
