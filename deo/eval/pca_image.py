"""``pca.png``: the first three principal components of patch features shown as RGB (DEO Figure 3).

PCA is fitted jointly over all patches of all shown tiles of one modality, each component is
min-max scaled over those patches to [0, 1], and its sign is fixed so that its largest loading is
positive (deterministic colours). Rows are tiles; columns are the MS input (true colour), its
feature PCA, the optical input and its feature PCA.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

from deo.io import storage

PANEL_PX = 128
GAP_PX = 4
HEADER_PX = 18
COLUMNS: tuple[str, ...] = ("MS input (B4,B3,B2)", "MS features PCA", "optical input", "optical features PCA")


def pca_rgb(feats: torch.Tensor) -> torch.Tensor:
    """Project patch features onto their first three principal components.

    Args:
        feats: (N, h, w, D) patch features, D >= 3.

    Returns:
        (N, h, w, 3) float32 in [0, 1].
    """
    if feats.ndim != 4 or feats.shape[-1] < 3:
        raise ValueError(f"feats must be (N, h, w, D) with D >= 3, got {tuple(feats.shape)}")
    n, h, w, d = feats.shape
    x = feats.reshape(-1, d).double()
    x = x - x.mean(0)
    # eigenvectors of the covariance, largest first
    _, vecs = torch.linalg.eigh(x.T @ x)
    comps = vecs[:, -3:].flip(1)
    signs = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))
    proj = x @ (comps * signs)
    lo, hi = proj.min(0).values, proj.max(0).values
    proj = (proj - lo) / (hi - lo).clamp_min(1e-12)
    return proj.float().reshape(n, h, w, 3)


def figure_size(n_tiles: int, panel: int = PANEL_PX) -> tuple[int, int]:
    """(width, height) in pixels of the figure for ``n_tiles`` rows."""
    width = len(COLUMNS) * panel + (len(COLUMNS) + 1) * GAP_PX
    height = HEADER_PX + n_tiles * panel + (n_tiles + 1) * GAP_PX
    return width, height


def _panels(x: torch.Tensor, panel: int, mode: str) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, panel, panel, 3) uint8."""
    kw = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
    y = F.interpolate(x.float(), size=(panel, panel), mode=mode, **kw).clamp(0, 1)
    return (y.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def save_pca_figure(
    uri: str,
    ms_rgb: torch.Tensor,
    ms_feats: torch.Tensor,
    optical_rgb: torch.Tensor,
    optical_feats: torch.Tensor,
    panel: int = PANEL_PX,
) -> tuple[int, int]:
    """Write the PCA figure as PNG.

    Args:
        uri: destination path or URI.
        ms_rgb: (N, 3, H, W) true colour of the MS tiles in [0, 255].
        ms_feats: (N, h, w, D) MS patch features.
        optical_rgb: (N, 3, H', W') optical inputs in [0, 255].
        optical_feats: (N, h', w', D) optical patch features.
        panel: side of each panel in pixels.

    Returns:
        (width, height) of the written image (:func:`figure_size`).
    """
    from PIL import Image, ImageDraw

    n = ms_rgb.shape[0]
    if not (ms_feats.shape[0] == optical_rgb.shape[0] == optical_feats.shape[0] == n):
        raise ValueError(
            f"tile counts differ: ms_rgb {n}, ms_feats {ms_feats.shape[0]}, optical_rgb "
            f"{optical_rgb.shape[0]}, optical_feats {optical_feats.shape[0]}"
        )
    cols = [
        _panels(ms_rgb / 255.0, panel, "bilinear"),
        _panels(pca_rgb(ms_feats).permute(0, 3, 1, 2), panel, "nearest"),
        _panels(optical_rgb / 255.0, panel, "bilinear"),
        _panels(pca_rgb(optical_feats).permute(0, 3, 1, 2), panel, "nearest"),
    ]
    width, height = figure_size(n, panel)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for r in range(n):
        top = HEADER_PX + GAP_PX + r * (panel + GAP_PX)
        for c, col in enumerate(cols):
            left = GAP_PX + c * (panel + GAP_PX)
            canvas[top : top + panel, left : left + panel] = col[r]
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for c, title in enumerate(COLUMNS):
        draw.text((GAP_PX + c * (panel + GAP_PX) + 2, 3), title, fill=(0, 0, 0))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    storage.write_bytes(uri, buf.getvalue())
    return width, height
