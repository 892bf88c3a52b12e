"""EMA teacher of the MS branch: a frozen copy of the student and ``head_ms`` updated by foreach lerp."""

from __future__ import annotations

import copy

import torch
from torch import nn

from deo.dist import local_tensor


class EMATeacher(nn.Module):
    """Exponential moving average of a module, updated with ``torch._foreach_lerp_``.

    teacher <- m * teacher + (1 - m) * student for float parameters and buffers; other buffers are
    copied. FSDP-sharded teacher and student (same units, :mod:`deo.train.parallel`) lerp their local
    shards, with no communication. As in timm's ``ModelEmaV3``, the result depends on the order of
    init, device move and DDP wrapping: build the EMA from the UNWRAPPED student AFTER moving it to
    its device and BEFORE the first optimizer step, and always update from the unwrapped module
    (``ddp.module``), never from a DDP wrapper (whose parameter names differ).
    """

    def __init__(self, model: nn.Module) -> None:
        """Deep-copy ``model`` (unwrapped, already on its device) into a frozen, eval-mode teacher."""
        super().__init__()
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True) -> EMATeacher:
        """Stay in eval mode (the teacher has no dropout or drop path at use)."""
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module, momentum: float | None = None,
               weight: torch.Tensor | None = None) -> None:
        """Lerp towards ``model`` (same structure as the copied one) with weight ``1 - momentum``.

        Give ``momentum``, or ``weight``: ``1 - momentum`` as a 0-dim tensor on the device (a CUDA graph
        reads it at every replay, where a float would be fixed at capture; computed on the host in
        float64, since 1 - momentum in float32 loses digits as momentum nears 1).
        """
        if (momentum is None) == (weight is None):
            raise ValueError("EMATeacher.update takes momentum or weight, not both or neither")
        ema_p, src_p = [], []
        for (name, e), (name_s, s) in zip(
            self.module.named_parameters(), model.named_parameters(), strict=True
        ):
            if name != name_s:
                raise ValueError(
                    f"EMA and model parameters differ: {name!r} vs {name_s!r} (pass the unwrapped model)"
                )
            ema_p.append(local_tensor(e))
            src_p.append(local_tensor(s.detach()))
        ema_b, src_b = [], []
        for e, s in zip(self.module.buffers(), model.buffers(), strict=True):
            if e.is_floating_point():
                ema_b.append(e)
                src_b.append(s.detach())
            else:
                e.copy_(s)
        for ema, src in ((ema_p, src_p), (ema_b, src_b)):
            if not ema:
                continue
            if weight is None:
                torch._foreach_lerp_(ema, src, 1.0 - momentum)
            else:  # ema += weight * (src - ema): lerp's formula, in multi-tensor kernels
                step = torch._foreach_sub(src, ema)
                torch._foreach_mul_(step, weight)
                torch._foreach_add_(ema, step)

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        """Run the averaged module without gradients."""
        with torch.no_grad():
            return self.module(*args, **kwargs)
