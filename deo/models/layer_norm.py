"""LayerNorm that keeps a bf16 input in bf16 under CUDA autocast (statistics still in float32).

CUDA autocast runs ``layer_norm`` in float32: a bf16 activation is cast up (a copy), normalised in float32,
written as float32 and cast down again by the next Linear (another copy), so every norm moves about five
times the bytes of a bf16-in, bf16-out norm, and anything between the norm and the Linear (Swin's roll
and window partition) moves float32. On one H100 the reference step spent 47 of its 332 ms in LayerNorm
forward and backward (``bench/RESULTS.md``). The CUDA and CPU kernels accumulate mean and variance in
float32 whatever the input dtype, so normalising in the input's dtype loses only the rounding of the
output, which the next Linear's autocast cast would round the same way. On CUDA, weight and bias are cast
to the input's dtype as autocast casts a Linear's weight: their gradients are accumulated in float32 by
the kernel, rounded to bf16 (about 0.3 % of their largest magnitude, ``bench/layer_norm_bench.py``) and
come back as float32 through the cast, as a Linear's weight gradients do under autocast.

What changes downstream, on CUDA under autocast: the stage-1 residual stream of the student is bf16 (it
was float32 after the patch embedding's norm; later stages already were bf16), and the final normalised
tokens of the student, the EMA teacher and DINOv3 come out in bf16. The losses normalise and compare
them in float32 as before. Without CUDA autocast, or for a float32 input, this is ``nn.LayerNorm`` (CPU
autocast already keeps bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm as TimmLayerNorm
from torch import nn

PLAIN_LAYER_NORMS = (nn.LayerNorm, TimmLayerNorm)
"""LayerNorm classes whose forward is plain ``F.layer_norm`` (timm's fast-norm flag aside)."""


class InputDtypeLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed in its input's dtype even under autocast (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., *normalized_shape) -> same shape and dtype as ``x``."""
        if x.device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
            return super().forward(x)  # CPU autocast already normalises bf16 in bf16 (fp32 parameters)
        w, b = self.weight, self.bias
        if w is not None and w.dtype != x.dtype:
            # CUDA's kernel needs one dtype; it accumulates weight and bias gradients in float32
            w, b = w.to(x.dtype), (b.to(x.dtype) if b is not None else None)
        with torch.autocast("cuda", enabled=False):
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def keep_input_dtype_in_layer_norms(module: nn.Module) -> nn.Module:
    """Make every plain LayerNorm in ``module`` (``nn.LayerNorm`` or timm's) an :class:`InputDtypeLayerNorm`,
    in place; parameters and state dict keys are unchanged. Other subclasses (timm's ``LayerNormFp32``, say)
    chose their own precision and are left alone. Returns ``module``."""
    for m in module.modules():
        if type(m) in PLAIN_LAYER_NORMS:
            m.__class__ = InputDtypeLayerNorm
    return module
