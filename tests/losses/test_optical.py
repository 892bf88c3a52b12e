import pytest
import torch
import torch.nn.functional as F

from deo.losses import OpticalDistillLoss


def test_optical_terms_match_loops():
    g = torch.Generator().manual_seed(1)
    vg, v, b, n, d = 2, 5, 3, 4, 8
    s_cls, t_cls = torch.randn(v, b, d, generator=g), torch.randn(vg, b, d, generator=g)
    s_pf, t_pf = torch.randn(vg, b, n, d, generator=g), torch.randn(vg, b, n, d, generator=g)
    s_pm, t_pm = torch.randn(vg, b, n, d, generator=g), torch.randn(vg, b, n, d, generator=g)
    total, parts = OpticalDistillLoss(1.0, 0.5, 0.25)(s_cls, t_cls, s_pf, t_pf, s_pm, t_pm)

    cls_terms = [
        F.cosine_similarity(t_cls[i], s_cls[j], dim=-1).mean()
        for i in range(vg)
        for j in range(v)
        if i != j
    ]
    cls = sum(cls_terms) / len(cls_terms)

    def per_patch(s, t):
        acc = [F.cosine_similarity(s[a, bb, k], t[a, bb, k], dim=0) for a in range(vg) for bb in range(b) for k in range(n)]
        return sum(acc) / len(acc)

    pf, pm = per_patch(s_pf, t_pf), per_patch(s_pm, t_pm)
    torch.testing.assert_close(parts["cls_cos"], cls)
    torch.testing.assert_close(parts["pF_cos"], pf)
    torch.testing.assert_close(parts["pmid_cos"], pm)
    torch.testing.assert_close(total, cls + 0.5 * pf + 0.25 * pm)


def test_zero_weight_skips_term():
    loss = OpticalDistillLoss(1.0, 0.0, 0.0)
    total, parts = loss(torch.randn(3, 2, 4), torch.randn(2, 2, 4), None, None, None, None)
    assert set(parts) == {"cls_cos"}
    with pytest.raises(ValueError, match="pF_cos has weight"):
        OpticalDistillLoss(1.0, 1.0, 0.0)(torch.randn(3, 2, 4), torch.randn(2, 2, 4), None, None, None, None)
