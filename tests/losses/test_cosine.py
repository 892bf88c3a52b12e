import pytest
import torch
import torch.nn.functional as F

from deo.losses import CompressionLoss, cross_view_cosine


def _reference(t, s):
    terms = []
    for i in range(t.shape[0]):
        for j in range(s.shape[0]):
            if i == j:
                continue
            cos = [F.cosine_similarity(t[i, b], s[j, b], dim=0) for b in range(t.shape[1])]
            terms.append(sum(cos) / len(cos))
    return sum(terms) / len(terms)


def test_compression_matches_loop():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    s = torch.randn(6, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    c, parts = CompressionLoss()(t, s)
    ref = _reference(t, s.double())
    torch.testing.assert_close(c.double(), ref.float().double(), rtol=1e-5, atol=1e-6)
    assert parts["compression"].requires_grad is False
    (gc,) = torch.autograd.grad(c, s)
    (gr,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(gc.double(), gr, rtol=1e-4, atol=1e-6)
    # same-view pairs are excluded: identical views change nothing for i == j
    assert cross_view_cosine(t, t.clone()).item() < 0.5


def test_compression_rejects_bad_shapes():
    with pytest.raises(ValueError, match="student must be"):
        cross_view_cosine(torch.randn(2, 3, 4), torch.randn(1, 3, 4))


def test_cosine_is_float32_under_bf16_autocast():
    """The docstring's float32 held for the normalisation only: the einsum ran in bf16 under autocast."""
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 64, 256, generator=g)
    s = torch.randn(12, 64, 256, generator=g) + t.repeat(6, 1, 1)
    want = cross_view_cosine(t, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cross_view_cosine(t.bfloat16(), s.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, cross_view_cosine(t.bfloat16().float(), s.bfloat16().float()))
    torch.testing.assert_close(got, want, rtol=1e-2, atol=0)
