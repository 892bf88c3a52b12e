"""Coding rate R (SimDINO expansion term, reference ``MCRLoss`` with expa_type 1) over the global batch."""

from __future__ import annotations

import torch
from torch import nn

from deo import dist


class CodingRateLoss(nn.Module):
    """R = mean_v 1/2 logdet(I_d + d / (B eps) Z_v^T Z_v) * (d + B) / (d B), Z_v = (s_v + t_v) / 2.

    B is the GLOBAL batch: with ``gather_distributed`` the d x d matrices Z_v^T Z_v are summed over ranks
    with gradients (:func:`deo.dist.all_reduce_sum`), so every rank computes the same R. Each rank's
    gradient w.r.t. its own rows is then ``world_size`` times the single-process gradient, exactly as for
    any mean-reduced loss, and DDP's gradient averaging restores the single-process update. Every rank
    must hold the same local batch size. Computed in float32 with autocast off (under bf16 the Cholesky
    factorisation fails); logdet = 2 sum log diag(cholesky(.)).

    Gradient accumulation: the rows of a step's other micro-batches enter as ``other_cov`` (their
    Z^T Z, without graph) and ``other_rows``, so R is that of the whole step's batch and the gradient
    w.r.t. this micro-batch's rows is exactly that of R over the whole batch.

    Plain loop it replaces (one process)::

        for v in range(V_g):
            z = (s[v] + t[v]) / 2                       # (B, d)
            m = torch.eye(d) + d / (B * eps) * z.T @ z
            r_v = 0.5 * torch.linalg.slogdet(m)[1] * (d + B) / (d * B)
        R = mean_v r_v
    """

    def __init__(self, eps: float = 0.05, gather_distributed: bool = False) -> None:
        """Set eps (``loss.eps``, the role of epsilon^2) and whether to sum over ranks.

        Raises:
            ValueError: eps <= 0, or ``gather_distributed`` without an available torch.distributed.
        """
        super().__init__()
        if eps <= 0:
            raise ValueError(f"coding-rate eps must be > 0, got {eps}")
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError(
                "gather_distributed=True needs torch.distributed, which this build lacks"
            )
        self.eps = eps
        self.gather_distributed = gather_distributed

    @staticmethod
    def covariance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """(V_g, B, d) student and teacher embeddings -> (V_g, d, d) float32 Z^T Z, Z = (s + t) / 2 (this rank)."""
        with torch.autocast(student.device.type, enabled=False):
            z = (student.float() + teacher.float()) / 2  # (V_g, B, d)
            return z.transpose(1, 2) @ z

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, other_cov: torch.Tensor | None = None,
        other_rows: int = 0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """R of the global views.

        Args:
            student: (V_g, B, d) student embeddings of the global views (this rank's rows).
            teacher: (V_g, B, d) EMA-teacher embeddings of the same views.
            other_cov: (V_g, d, d) :meth:`covariance` of this rank's other rows of the step (the other
                micro-batches under gradient accumulation), treated as constants; None: no other rows.
            other_rows: how many rows ``other_cov`` sums over.

        Returns:
            (R, {"coding_rate": detached R}); R is maximised (the task subtracts gamma R).
        """
        if student.shape != teacher.shape or student.ndim != 3:
            raise ValueError(
                f"student and teacher must both be (V_g, B, d), got {tuple(student.shape)} and {tuple(teacher.shape)}"
            )
        if self.gather_distributed and not dist.is_distributed():
            raise ValueError(
                "gather_distributed=True but no torch.distributed process group is initialised; "
                "init_process_group first or pass gather_distributed=False"
            )
        vg, n, d = student.shape
        if other_cov is not None and tuple(other_cov.shape) != (vg, d, d):
            raise ValueError(f"other_cov must be (V_g, d, d) = {(vg, d, d)}, got {tuple(other_cov.shape)}")
        with torch.autocast(student.device.type, enabled=False):
            cov = self.covariance(student, teacher)  # (V_g, d, d)
            if other_cov is not None:
                cov = cov + other_cov.detach().float()
                n = n + other_rows
            if self.gather_distributed:
                cov = dist.all_reduce_sum(cov)
                n = n * dist.get_world_size()
            eye = torch.eye(d, device=cov.device, dtype=cov.dtype)
            m = eye + (d / (n * self.eps)) * cov
            # cholesky_ex: no host sync, and a non-PD (NaN) input yields a NaN R that the task reports by name
            chol, _ = torch.linalg.cholesky_ex(m)
            logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (V_g,)
            r = (0.5 * logdet * (d + n) / (d * n)).mean()
        return r, {"coding_rate": r.detach()}
