"""Experiment for issue 10: the MS and optical views of one size in ONE pass through the shared Swin stages.

The student runs four trunk passes per step (MS global, MS local, optical global, optical local). Views of
the same size share the stages after their patch embeddings, so two passes of twice the batch compute the
same outputs with half the kernel launches. One H100 measurement, with the global views only, found no
gain while the step was bound by its kernels (bench/RESULTS.md, third session). Since the attention fix,
the eager step is partly host-bound (fourth session), and halving the launches may now pay.
``bench/gpu_step.py`` variant ``ref_joint_trunk`` swaps :func:`joint_trunk_forward` in for
``DEOTrainable.forward`` to measure it side by side with ``ref_eager``.

Same outputs as ``DEOTrainable.forward`` for the DEO objective (MS branch + the three optical terms);
stochastic depth draws its per-sample masks in another order, so with ``model.drop_path`` > 0 the
outputs match in distribution, not value by value. MSAD and GSD are not covered.
"""

from __future__ import annotations

from typing import Any

import torch

from deo.train.task import _to_grid


def joint_trunk_forward(
    self: Any, views: dict[str, torch.Tensor], teacher_grid: tuple[int, int] = (0, 0),
    partner_tokens: torch.Tensor | None = None, ms_global_only: bool = False,
) -> dict[str, torch.Tensor]:
    """``DEOTrainable.forward`` (``self``) with one trunk pass per view size (see the module docstring)."""
    if ms_global_only:  # the first pass of gradient accumulation: the MS global views alone, as the task does
        return type(self).forward(self, views, ms_global_only=True)
    if self.use["msad"] or self.use["gsd"] or not all(self.use[k] for k in ("cls", "pF", "pmid")):
        raise ValueError("joint_trunk_forward covers the DEO objective (cls, pF, pmid; no MSAD or GSD)")
    if "opt_local" not in views:
        raise ValueError("joint_trunk_forward needs the optical local views")
    student = self.student
    g, loc = views["ms_global"], views["ms_local"]
    vg, b = g.shape[:2]
    ng, nl = g.shape[0] * b, loc.shape[0] * b
    mid = len(student.stage_dims) - 2
    glob = torch.cat([student.embed(g.flatten(0, 1), "ms"),
                      student.embed(views["opt_global"].flatten(0, 1), "optical")])  # (2 Ng, h, w, C)
    final_g, taken = student.stages_of_tokens(glob, [mid, mid + 1])
    local = torch.cat([student.embed(loc.flatten(0, 1), "ms"),
                       student.embed(views["opt_local"].flatten(0, 1), "optical")])  # (2 Nl, h, w, C)
    final_l, _ = student.stages_of_tokens(local, [mid])  # (stage 3 unused here)
    pooled_ms = torch.cat([final_g[:ng].mean(dim=(1, 2)), final_l[:nl].mean(dim=(1, 2))])
    final_o = final_g[ng:]
    out = {"s_ms": self.head_ms(pooled_ms).view(-1, b, self.head_ms.mlp[-1].out_features)}
    pooled_o = torch.cat([final_o.mean(dim=(1, 2)), final_l[nl:].mean(dim=(1, 2))])
    out["s_cls"] = self.head_cls(pooled_o).view(-1, b, self.head_cls.mlp[-1].out_features)
    out["s_pF"] = _to_grid(self.head_pF(taken[mid + 1][ng:]), teacher_grid).view(
        vg, b, -1, self.head_pF.mlp[-1].out_features)
    out["s_pmid"] = _to_grid(self.head_pmid(taken[mid][ng:]), teacher_grid).view(
        vg, b, -1, self.head_pmid.mlp[-1].out_features)
    return out
