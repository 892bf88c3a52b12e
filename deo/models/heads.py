"""Projection heads of the student: ``head_ms`` (L2-normalised DINO-style MLP) and the optical heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLPHead(nn.Module):
    """``layers``-layer MLP (Linear-GELU between layers) mapping (..., in_dim) -> (..., out_dim).

    With ``normalize`` the output is L2-normalised (``head_ms``: no prototype layer after it). Used as
    ``head_ms`` (hidden 2048, out 256) and, un-normalised onto the teacher width, as ``head_cls``,
    ``head_pF`` and ``head_pmid`` (with Swin-T and a ViT-B teacher the student, its four heads and
    embeddings total about 55M trainable parameters, as in the reference implementation).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: int = 2048,
        layers: int = 3,
        normalize: bool = False,
    ) -> None:
        """Build the MLP.

        Args:
            in_dim: input width.
            out_dim: output width.
            hidden: hidden width.
            layers: number of Linear layers (>= 1).
            normalize: L2-normalise the output.
        """
        super().__init__()
        if layers < 1:
            raise ValueError(f"head layers must be >= 1, got {layers}")
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        self.normalize = normalize
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        y = self.mlp(x)
        # normalise in float32: bf16 norms of 256-d vectors lose ~3 digits
        return F.normalize(y.float(), dim=-1) if self.normalize else y
