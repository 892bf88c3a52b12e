"""LayerNorm under CUDA bf16 autocast: autocast's float32 norm vs ``InputDtypeLayerNorm`` (GPU, issue 10).

At the Swin-T stage-1 shape of the reference step (128 x 56 x 56 tokens, 96 channels, bf16 activations):
forward + backward time of each, and how far each output and gradient is from a float64 norm of the same
bf16 input with the same bf16 upstream gradient (max error relative to the reference's max magnitude).

    python bench/layer_norm_bench.py --out /tmp/ln.json     # one H100: seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from deo.models.layer_norm import keep_input_dtype_in_layer_norms  # noqa: E402

from step_bench import emit  # noqa: E402


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max() / ref.abs().max())


def measure(norm: nn.Module, x: torch.Tensor, g: torch.Tensor, ref: dict[str, torch.Tensor], steps: int) -> dict[str, Any]:
    """Median ms of forward + backward, output dtype, and errors against ``ref``."""
    times = []
    for i in range(steps + 3):
        norm.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = norm(xi)
        y.backward(g.to(y.dtype))
        torch.cuda.synchronize()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": round(statistics.median(times), 3), "out_dtype": str(y.dtype),
            "err_out": _rel(y, ref["y"]), "err_grad_x": _rel(xi.grad, ref["gx"]),
            "err_grad_weight": _rel(norm.weight.grad, ref["gw"]), "err_grad_bias": _rel(norm.bias.grad, ref["gb"])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Both norms side by side; the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--tokens", type=int, default=128 * 56 * 56)
    ap.add_argument("--dim", type=int, default=96)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    x = (torch.randn(args.tokens, args.dim, device=dev) * 3 + 1).bfloat16()
    g = torch.randn(args.tokens, args.dim, device=dev).bfloat16()
    base = nn.LayerNorm(args.dim).to(dev)
    with torch.no_grad():
        base.weight.uniform_(0.5, 1.5)
        base.bias.uniform_(-0.5, 0.5)
    # float64 reference on the same bf16 input and upstream gradient
    xd = x.double().requires_grad_(True)
    wd, bd = base.weight.detach().double().requires_grad_(True), base.bias.detach().double().requires_grad_(True)
    yd = F.layer_norm(xd, (args.dim,), wd, bd, base.eps)
    yd.backward(g.double())
    ref = {"y": yd.detach(), "gx": xd.grad, "gw": wd.grad, "gb": bd.grad}
    ours = nn.LayerNorm(args.dim).to(dev)
    ours.load_state_dict(base.state_dict())
    keep_input_dtype_in_layer_norms(ours)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "shape": [args.tokens, args.dim], "input": "bf16, under bf16 autocast",
              "autocast_fp32_layer_norm": measure(base, x, g, ref, args.steps),
              "input_dtype_layer_norm": measure(ours, x, g, ref, args.steps)}
    report["speedup"] = round(report["autocast_fp32_layer_norm"]["ms"] / report["input_dtype_layer_norm"]["ms"], 2)
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
