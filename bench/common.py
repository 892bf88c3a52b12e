"""What the benchmark scripts share: atomic JSON records, a free local port, and a FLOP counter that also
sees the CPU's attention.

Kept apart from ``gpu_step.py`` so that ``public_step.py`` (the public code's step) does not import deo.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import torch


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically: a reader (gpu_session.sh's copier) never sees half a file."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 free at the time of asking (for a local process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flop_counter() -> Any:
    """A ``FlopCounterMode`` that also counts the CPU's fused attention kernels.

    torch registers FLOP formulas for the CUDA attention kernels only, so on the CPU every
    ``scaled_dot_product_attention`` (deo's Swin windows, timm's DINOv3) counted 0 while the public
    code's torchvision Swin, which multiplies explicitly, counted its attention: CPU counts of the two
    steps were not comparable. The same formulas as the CUDA kernels'.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(q: Any, k: Any, v: Any, *_: Any, out_shape: Any = None, **__: Any) -> int:
        return sdpa_flop_count(q, k, v)

    def backward(grad: Any, q: Any, k: Any, v: Any, *_: Any, out_shape: Any = None, **__: Any) -> int:
        return sdpa_backward_flop_count(grad, q, k, v)

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    })
