"""Cross-view cosine agreement: the compression term C of DEO (and the optical [cls] term)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cross_view_cosine(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean over pairs (i teacher view, j student view, i != j) of mean_b cos(t_i[b], s_j[b]).

    Student views 0..V_g-1 are the same views as the teacher's, so those pairs i == j are excluded.
    Computed in float32. Equivalent plain loop::

        terms = [F.cosine_similarity(teacher[i], student[j], dim=-1).mean()
                 for i in range(Vg) for j in range(V) if i != j]
        return torch.stack(terms).mean()

    Args:
        teacher: (V_g, B, D) teacher embeddings of the global views.
        student: (V, B, D) student embeddings, global views first, V >= V_g.

    Returns:
        Scalar mean cosine (to be maximised).
    """
    vg, b, d = teacher.shape
    if student.ndim != 3 or student.shape[1:] != (b, d) or student.shape[0] < vg:
        raise ValueError(
            f"student must be (V >= {vg}, {b}, {d}) to match teacher {tuple(teacher.shape)}, got {tuple(student.shape)}"
        )
    v = student.shape[0]
    # autocast would run the einsum in bf16 (about 0.2 % error in C and cls_cos)
    with torch.autocast(student.device.type, enabled=False):
        t = F.normalize(teacher.float(), dim=-1)
        s = F.normalize(student.float(), dim=-1)
        cos = torch.einsum("ibd,jbd->ij", t, s) / b  # (V_g, V): mean over the batch
    # all pairs minus the diagonal (i == j); boolean-mask indexing would sync the host on CUDA
    return (cos.sum() - cos.diagonal().sum()) / (vg * v - vg)


class CompressionLoss(nn.Module):
    """C: agreement of the EMA teacher (global views) with the student (all views), DESIGN Method.

    Returns C itself (maximised; the task subtracts it) and its detached parts.
    """

    def forward(
        self, teacher: torch.Tensor, student: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """C from teacher (V_g, B, d) and student (V, B, d) -> (scalar, {"compression": detached})."""
        c = cross_view_cosine(teacher, student)
        return c, {"compression": c.detach()}
