"""PCA feature image: components against numpy SVD, and a valid PNG of the documented size."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from deo.eval.pca_image import figure_size, pca_rgb, save_pca_figure


def test_pca_rgb_matches_numpy_svd():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 5, 5, 16, generator=g) * torch.linspace(0.1, 3, 16)
    got = pca_rgb(feats).reshape(-1, 3).numpy()
    x = feats.reshape(-1, 16).double().numpy()
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    for c in range(3):
        v = vt[c] * np.sign(vt[c][np.abs(vt[c]).argmax()])
        p = x @ v
        np.testing.assert_allclose(got[:, c], (p - p.min()) / (p.max() - p.min()), atol=1e-5)


def test_save_pca_figure_writes_png_of_expected_size(tmp_path):
    g = torch.Generator().manual_seed(1)
    rgb = torch.rand(3, 3, 64, 64, generator=g) * 255
    feats = torch.randn(3, 8, 8, 32, generator=g)
    size = save_pca_figure(str(tmp_path / "pca.png"), rgb, feats, rgb, feats, panel=96)
    assert size == figure_size(3, 96) == (4 * 96 + 5 * 4, 18 + 3 * 96 + 4 * 4)
    assert (tmp_path / "pca.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(tmp_path / "pca.png")
    assert img.size == size and img.mode == "RGB"
    # first tile's input panel holds the (resized) input, not blank paper
    arr = np.asarray(img)
    assert arr[18 + 4 : 18 + 4 + 96, 4 : 4 + 96].std() > 10
