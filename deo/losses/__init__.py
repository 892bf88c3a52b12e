"""Losses of DEO (C, R, L_O) and the X-STARS / SatDINO options (MSAD, GSD), one per file."""

from deo.losses.coding_rate import CodingRateLoss
from deo.losses.cosine import CompressionLoss, cross_view_cosine
from deo.losses.gsd import GSDLoss
from deo.losses.msad import MSADLoss
from deo.losses.optical import OpticalDistillLoss, patch_cosine

__all__ = [
    "CodingRateLoss",
    "CompressionLoss",
    "GSDLoss",
    "MSADLoss",
    "OpticalDistillLoss",
    "cross_view_cosine",
    "patch_cosine",
]
