"""FLOPs of one Swin-T trunk forward per crop size: the public code's trunk against deo's student.

The public DEO code runs torchvision's ``swin_t``, which zero-pads every stage's token grid up to a
multiple of its 7 x 7 window (a 96 px crop: grids 24/12/6/3 padded to 28/14/7/7) and runs the padded
tokens through the attention's projections. deo's student adapts each block's window to the grid
(``deo/models/swin_window.py``: windows 6/6/6/3 at 96 px), so no token is padded. This script counts
both with ``FlopCounterMode`` (forward, batch 1, no gradients) at the reference crops, to attribute the
difference between the two steps' FLOPs (``public_step.py --count-flops`` and ``gpu_step.py``'s
``flops_per_step``); a third column counts deo's student with the padding torchvision would add.

    python bench/trunk_flops.py [--out trunk_flops.json]
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_step  # noqa: E402
from common import flop_counter, write_json  # noqa: E402

from deo.models import swin_window  # noqa: E402
from deo.models.student import build_student  # noqa: E402


def gflops(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> float:
    """GFLOPs of ``fn(x)`` (forward only, no gradients)."""
    with flop_counter() as counter, torch.no_grad():
        fn(x)
    return counter.get_total_flops() / 1e9


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="224,96", help="crop sides in pixels")
    ap.add_argument("--out", default=None, help="JSON of the table")
    args = ap.parse_args(argv)
    cfg = gpu_step.variant_config(gpu_step.VARIANTS[0], smoke=False, batch=1)  # the reference student
    student = build_student(cfg.model).eval()
    public_trunk = torchvision.models.swin_t().eval()  # what the public code's MultiCropWrapper runs
    ms_trunk = functools.partial(student.forward_features, modality="ms")
    rows = {}
    for px in (int(s) for s in args.sizes.split(",")):
        ms, rgb = torch.randn(1, 10, px, px), torch.randn(1, 3, px, px)
        deo = gflops(ms_trunk, ms)
        # torchvision's padding: every grid padded up to a multiple of the built window
        adaptive = swin_window.effective_window
        swin_window.effective_window = lambda grid, window: window
        try:
            deo_padded = gflops(ms_trunk, ms)
        finally:
            swin_window.effective_window = adaptive
        public = gflops(public_trunk.features, rgb)
        rows[px] = {"deo_gflops": round(deo, 3), "deo_padded_gflops": round(deo_padded, 3),
                    "public_swin_t_gflops": round(public, 3), "deo_vs_public": round(deo / public, 3)}
        print(f"{px} px: deo {deo:.3f} GFLOP, deo padded as torchvision {deo_padded:.3f}, "
              f"public swin_t {public:.3f} ({deo / public:.3f}x)", flush=True)
    if args.out:
        write_json(args.out, {"command": "python bench/trunk_flops.py " + " ".join(argv or sys.argv[1:]),
                              "torch": torch.__version__, "per_crop": rows})
    return rows


if __name__ == "__main__":
    main()
