"""Window attention inside Swin: which implementation makes the student's stages fastest? (GPU, issue 10)

Times forward + backward of the Swin-T stages (all 12 blocks and the final norm, the student's shared
trunk) under bf16 autocast at the reference config's two view sets: 128 global views (2 x 64) at 224 px
(a 56 x 56 token grid) and 640 local views (10 x 64) at 96 px (24 x 24). Only the function that
computes attention inside the windows (``deo.models.swin_window.window_attention``) changes between
rows:

    sdpa             the project's: SDPA with the bias (+ shifted mask) materialised per window (B*nW, heads, N, N)
    sdpa_broadcast   as before the fourth session: unshifted blocks broadcast the bias over the windows,
                     which SDPA's fused kernels refuse (math path)
    sdpa_efficient   the same, SDPA restricted to the memory-efficient kernel
    sdpa_cudnn       the same, SDPA restricted to cuDNN attention
    sdpa_math        the same, SDPA restricted to the math (unfused) path
    explicit         q k^T + bias + mask broadcast over images (no repeated mask), softmax, @ v
    flex             FlexAttention (compiled) with the bias and mask read inside the kernel (score_mod)
    none             attention skipped (returns v): the floor that no attention kernel can beat

Each row also gives peak memory. ``--compile`` adds regional compilation of every block (as
``train.compile``) for ``sdpa`` and ``explicit`` at 224 px.

    python bench/window_attn_bench.py --out /tmp/attn.json            # H100: about 2 minutes
    python bench/window_attn_bench.py --smoke --out /tmp/attn.json    # CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from deo.models import swin_window  # noqa: E402
from deo.models.student import build_swin  # noqa: E402

from step_bench import emit  # noqa: E402

ORIGINAL = swin_window.window_attention


def _backend(name: str) -> Callable[..., torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, name)

    def impl(*args: Any, **kw: Any) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return ORIGINAL(*args, **kw)

    return impl


def broadcast_bias(q, k, v, bias, mask, dropout_p=0.0):  # noqa: ANN001, ANN201
    """SDPA as before the fourth session: without a mask, the bias broadcast over windows (math path)."""
    bias = bias.unsqueeze(0).to(q.dtype)
    if mask is not None:
        bias = (bias + mask.unsqueeze(1).to(q.dtype)).repeat(q.shape[0] // mask.shape[0], 1, 1, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)


def repeated_bias(q, k, v, bias, mask, dropout_p=0.0):  # noqa: ANN001, ANN201
    """SDPA as before the sixth session: the bias repeated per window with unaligned rows (N = 49 or 36),
    which SDPA's memory-efficient kernel copies into a padded one (and autograd back)."""
    bias = bias.unsqueeze(0).to(q.dtype)
    if mask is not None:
        bias = bias + mask.unsqueeze(1).to(q.dtype)
    bias = bias.repeat(q.shape[0] // bias.shape[0], 1, 1, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)


def permuted_qkv_split(qkv, heads):  # noqa: ANN001, ANN201
    """timm's q, k, v split, as before the sixth session: unbind of a (3, windows, heads, N, hd) permute
    (its backward: a stack, then a permuted copy into the projection's layout)."""
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def explicit(q, k, v, bias, mask, dropout_p=0.0):  # noqa: ANN001, ANN201
    """Scores (B*nW, heads, N, N) with the mask broadcast over images instead of repeated."""
    n = q.shape[-2]
    images = q.shape[0] // mask.shape[0] if mask is not None else 1
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        nw = mask.shape[0]
        scores = scores.view(images, nw, -1, n, n) + (bias.unsqueeze(0) + mask.unsqueeze(1)).to(q.dtype)
        scores = scores.view(-1, scores.shape[2], n, n)
    else:
        scores = scores + bias.to(q.dtype)
    attn = scores.softmax(-1)
    if dropout_p:
        attn = F.dropout(attn, dropout_p)
    return attn @ v


def _flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def impl(q, k, v, bias, mask, dropout_p=0.0):  # noqa: ANN001, ANN202
        n = q.shape[-2]
        m = mask if mask is not None else torch.zeros((1, n, n), device=q.device)
        m = m.to(q.dtype)
        nw = m.shape[0]
        b = bias.to(q.dtype)

        def score_mod(score, bi, h, qi, ki):  # noqa: ANN001, ANN202
            return score + b[h, qi, ki] + m[bi % nw, qi, ki]

        return compiled(q, k, v, score_mod=score_mod)

    return impl


def none(q, k, v, bias, mask, dropout_p=0.0):  # noqa: ANN001, ANN201
    """No attention: the rest of the block alone."""
    return v + 0 * bias.sum()


IMPLS: dict[str, Callable[[], Callable[..., torch.Tensor]]] = {
    "sdpa": lambda: ORIGINAL,
    "sdpa_broadcast": lambda: broadcast_bias,
    "sdpa_efficient": lambda: _backend("EFFICIENT_ATTENTION"),
    "sdpa_cudnn": lambda: _backend("CUDNN_ATTENTION"),
    "sdpa_math": lambda: _backend("MATH"),
    "explicit": lambda: explicit,
    "flex": _flex,
    "none": lambda: none,
}


def time_trunk(model: torch.nn.Module, x: torch.Tensor, steps: int, warmup: int, cuda: bool) -> dict[str, Any]:
    """Median ms of forward + backward of ``model.layers`` + ``model.norm`` on tokens ``x`` (B, H, W, C)."""
    dtype = torch.bfloat16 if cuda else torch.float32
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.autocast(x.device.type, dtype=dtype, enabled=cuda):
            out = model.norm(model.layers(x))
        out.float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    model.zero_grad(set_to_none=True)
    res = {"ms": round(statistics.median(times), 2)}
    if cuda:
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time every implementation at both view sets; write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny student and batch")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated implementations (default: all)")
    ap.add_argument("--compile", action="store_true", help="also regional compile of sdpa and explicit")
    ap.add_argument("--budget-s", type=float, default=150)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    start = time.perf_counter()
    if args.smoke:
        model = build_swin("swin_deo_tiny", 64).to(device)
        sets = {"global": (4, 16), "local": (8, 8)}
        args.steps, args.warmup = 2, 1
    else:
        model = build_swin("swin_tiny_patch4_window7_224", 224).to(device)
        sets = {"global_224": (128, 56), "local_96": (640, 24)}
    model.train()
    dim = model.layers[0].dim
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                              "trunk": "swin_deo_tiny" if args.smoke else "swin_tiny (12 blocks + norm)",
                              "sets": {k: f"{b} x {g}x{g} tokens" for k, (b, g) in sets.items()}, "rows": {}}
    chosen = [n for n in args.only.split(",") if n] or list(IMPLS)
    plans = [(n, False) for n in chosen] + ([("sdpa", True), ("explicit", True)] if args.compile else [])
    for name, compiled in plans:
        label = name + ("_compiled" if compiled else "")
        if time.perf_counter() - start > args.budget_s:
            report["rows"][label] = {"status": "skipped: budget"}
            continue
        row: dict[str, Any] = {}
        try:
            swin_window.window_attention = IMPLS[name]()
            if compiled:
                torch._dynamo.reset()
                for stage in model.layers:
                    for block in stage.blocks:
                        block.compile(dynamic=False)
            t0 = time.perf_counter()
            for key, (b, g) in sets.items():
                if compiled and key != next(iter(sets)):
                    continue
                x = torch.randn(b, g, g, dim, device=device, requires_grad=True)
                row[key] = time_trunk(model, x, args.steps, args.warmup, cuda)
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            row["status"] = "ok"
        except Exception as e:  # one failing kernel must not hide the others
            row.update(status=f"error: {type(e).__name__}: {e}"[:400], traceback=traceback.format_exc()[-1500:])
        finally:
            swin_window.window_attention = ORIGINAL
            if compiled:
                for stage in model.layers:
                    for block in stage.blocks:
                        block._compiled_call_impl = None
        report["rows"][label] = row
        print(label, {k: v for k, v in row.items() if k != "traceback"}, flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1))  # a timeout keeps what finished
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
