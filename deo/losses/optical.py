"""L_O: distillation of the frozen DINOv3 teacher into the student's optical heads (DESIGN Method)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deo.losses.cosine import cross_view_cosine


def patch_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over views, batch and patches of cos(student[v, b, n], teacher[v, b, n]) in float32.

    Args:
        student: (V_g, B, N, D) student patch tokens on the teacher's grid.
        teacher: (V_g, B, N, D) teacher patch tokens of the same views.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher patches must match, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    return F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-6).mean()


class OpticalDistillLoss(nn.Module):
    """alpha1 cls_cos + alpha2 pF_cos + alpha3 pmid_cos (maximised; the task subtracts it).

    cls_cos pairs as C (teacher global view i vs student view j, i != j); pF_cos and pmid_cos are the
    mean per-patch cosine between student and teacher on the same global view. A weight of 0 skips its
    term (its input may then be None).
    """

    def __init__(self, alpha1: float = 1.0, alpha2: float = 0.5, alpha3: float = 0.5) -> None:
        """Set the three weights (``loss.alpha1..3``, each >= 0)."""
        super().__init__()
        for k, v in (("alpha1", alpha1), ("alpha2", alpha2), ("alpha3", alpha3)):
            if v < 0:
                raise ValueError(f"loss.{k} must be >= 0, got {v}")
        self.alpha = (alpha1, alpha2, alpha3)

    def forward(
        self,
        student_cls: torch.Tensor | None,
        teacher_cls: torch.Tensor | None,
        student_pf: torch.Tensor | None,
        teacher_pf: torch.Tensor | None,
        student_pmid: torch.Tensor | None,
        teacher_pmid: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted optical agreement.

        Args:
            student_cls: (V, B, D) head_cls of every optical view; teacher_cls (V_g, B, D).
            student_pf, teacher_pf: (V_g, B, N, D) final-block patches on the teacher grid.
            student_pmid, teacher_pmid: (V_g, B, N, D) intermediate-block patches.

        Returns:
            (weighted sum, detached {"cls_cos", "pF_cos", "pmid_cos"} of the computed terms).
        """
        a1, a2, a3 = self.alpha
        total: torch.Tensor | None = None
        parts: dict[str, torch.Tensor] = {}
        for name, w, fn, x, y in (
            ("cls_cos", a1, cross_view_cosine, teacher_cls, student_cls),
            ("pF_cos", a2, patch_cosine, student_pf, teacher_pf),
            ("pmid_cos", a3, patch_cosine, student_pmid, teacher_pmid),
        ):
            if w == 0:
                continue
            if x is None or y is None:
                raise ValueError(f"{name} has weight {w} but its inputs are missing")
            v = fn(x, y)
            parts[name] = v.detach()
            total = w * v if total is None else total + w * v
        if total is None:
            raise ValueError(
                "all optical weights are 0; skip OpticalDistillLoss instead of calling it"
            )
        return total, parts
