import math

import pytest
import torch
import torch.nn.functional as F

from deo.losses import MSADLoss


def _reference(a, b, tau, alpha):
    n, t_len, _ = a.shape
    total = 0.0
    for t in range(t_len):
        loss_t = 0.0
        for i in range(n):
            la = torch.stack([F.cosine_similarity(a[i, t], b[k, t], dim=0) / tau for k in range(n)]).log_softmax(0)
            lb = torch.stack([F.cosine_similarity(b[i, t], a[k, t], dim=0) / tau for k in range(n)]).log_softmax(0)
            for j in range(n):
                y = 1 - alpha if i == j else alpha / (n - 1)
                loss_t = loss_t - y * (la[j] + lb[j]) / (2 * n)
        total = total + loss_t
    return total / t_len


def test_msad_value_and_gradients_match_loop():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    loss, parts = MSADLoss(0.1, 0.3)(a, b)
    ref = _reference(a, b, 0.1, 0.3)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    ga, gb = torch.autograd.grad(loss, (a, b))
    ra, rb = torch.autograd.grad(ref, (a, b))
    torch.testing.assert_close(ga.double(), ra, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-4, atol=1e-6)
    assert ga.abs().sum() > 0 and gb.abs().sum() > 0


def test_msad_perfect_alignment_reaches_smoothed_entropy_bound():
    # identical, orthogonal features: p is near one-hot, loss -> -(1-alpha) log(1) - alpha log(~0) is large,
    # while with alpha = 0 it tends to 0
    a = torch.eye(4).unsqueeze(1).repeat(1, 2, 1)
    loss0, _ = MSADLoss(0.01, 0.0)(a, a)
    assert loss0 < 1e-6
    loss3, _ = MSADLoss(0.01, 0.3)(a, a)
    assert loss3 > 10 * math.log(2)


def test_msad_needs_two_pairs():
    with pytest.raises(ValueError, match="at least 2 pairs"):
        MSADLoss()(torch.randn(1, 3, 4), torch.randn(1, 3, 4))
