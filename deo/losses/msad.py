"""MSAD (X-STARS): patch-wise InfoNCE with label smoothing between co-located images of two sensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MSADLoss(nn.Module):
    """Multi-sensor alignment dense loss (DESIGN Method, X-STARS Eq. 8).

    For each token position t: p^A_ij[t] = softmax_k(cos(v^A_i[t], v^B_k[t]) / tau) over the N pairs of
    the batch, p^B symmetric (B against A); targets y~ = (1 - alpha) on the diagonal and alpha / (N - 1)
    off it. L = mean_t of -(1 / 2N) sum_ij y~_ij (log p^A_ij[t] + log p^B_ij[t]). This is the per-token
    mean reading of Eq. 8: the cross-entropy is formed per token position and averaged over the T
    positions (not summed, so the scale does not depend on the grid size). Computed in float32.

    Plain loop it replaces::

        for t in range(T):
            for i in range(N):
                la = log_softmax([cos(a[i, t], b[k, t]) / tau for k in range(N)])
                lb = log_softmax([cos(b[i, t], a[k, t]) / tau for k in range(N)])
                loss_t -= sum_j y[i, j] * (la[j] + lb[j]) / (2 N)
        L = mean_t loss_t
    """

    def __init__(self, tau: float = 0.1, smoothing: float = 0.3) -> None:
        """Set tau (``loss.msad_tau``, > 0) and alpha (``loss.msad_smoothing``, in [0, 1))."""
        super().__init__()
        if tau <= 0:
            raise ValueError(f"loss.msad_tau must be > 0, got {tau}")
        if not 0 <= smoothing < 1:
            raise ValueError(f"loss.msad_smoothing must be in [0, 1), got {smoothing}")
        self.tau = tau
        self.smoothing = smoothing

    def forward(
        self, va: torch.Tensor, vb: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MSAD of projected patch tokens.

        Args:
            va: (N, T, D) psi_A of sensor-A patch tokens (N pairs, T token positions).
            vb: (N, T, D) psi_B of the co-located sensor-B tokens, same grid.

        Returns:
            (L_MSAD, {"msad": detached L}).
        """
        if va.shape != vb.shape or va.ndim != 3:
            raise ValueError(
                f"va and vb must both be (N, T, D), got {tuple(va.shape)} and {tuple(vb.shape)}"
            )
        n = va.shape[0]
        if n < 2:
            raise ValueError(f"MSAD needs at least 2 pairs in the batch, got {n}")
        with torch.autocast(va.device.type, enabled=False):
            a = F.normalize(va.float(), dim=-1).transpose(0, 1)  # (T, N, D)
            b = F.normalize(vb.float(), dim=-1).transpose(0, 1)
            logits = a @ b.transpose(1, 2) / self.tau  # (T, N, N): [t, i, k] = cos(a_i, b_k) / tau
            log_pa = logits.log_softmax(dim=-1)
            log_pb = logits.transpose(1, 2).log_softmax(dim=-1)  # [t, i, k] = cos(b_i, a_k) / tau
            y = torch.full((n, n), self.smoothing / (n - 1), device=a.device)
            y.fill_diagonal_(1 - self.smoothing)
            per_token = -(y * (log_pa + log_pb)).sum(dim=(1, 2)) / (2 * n)  # (T,)
            loss = per_token.mean()
        return loss, {"msad": loss.detach()}
