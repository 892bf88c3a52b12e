"""SatDINO GSD regression: MSE between predicted and true log ground sampling distance."""

from __future__ import annotations

import torch
from torch import nn


class GSDLoss(nn.Module):
    """mean((pred - log(target_gsd))^2), in float32.

    The target is the view's true GSD in metres (tile GSD x crop side / output side, see
    :func:`deo.data.multicrop.view_gsd`); the prediction is a log-GSD from a linear head.
    """

    def forward(
        self, pred_log_gsd: torch.Tensor, target_gsd: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of predictions (...,) against target GSDs (...,) in metres (> 0)."""
        if pred_log_gsd.shape != target_gsd.shape:
            raise ValueError(
                f"prediction {tuple(pred_log_gsd.shape)} and target {tuple(target_gsd.shape)} shapes differ"
            )
        with torch.autocast(pred_log_gsd.device.type, enabled=False):
            loss = (pred_log_gsd.float() - target_gsd.float().log()).pow(2).mean()
        return loss, {"gsd": loss.detach()}
