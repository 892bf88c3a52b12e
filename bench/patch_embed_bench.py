"""The student's patch embedding as one matrix product (LinearPatchEmbed) against timm's strided convolution.

Forward + backward of one embedding, side by side in one process, at the reference step's shapes (the
10-band embedding on the 2 global views of batch 64 is 128 x 10 x 224^2; ``--batch`` scales it). On
CUDA under bf16 autocast, as in training; on the CPU in float32, as the embedded default trains.

    python bench/patch_embed_bench.py [--batch 8] [--px 224,96] [--reps 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from deo.models.patch_embed import LinearPatchEmbed, make_patch_embed


def time_ms(fn: object, reps: int, cuda: bool) -> float:
    """Median ms of ``fn()`` over ``reps`` runs after 3 warm-ups."""
    for _ in range(3):
        fn()  # type: ignore[operator]
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=None, help="views per call (128 on CUDA, 8 on the CPU)")
    ap.add_argument("--px", default="224,96", help="view sides")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch = args.batch or (128 if cuda else 8)
    embed = make_patch_embed(10, 96, 4, 224).to(device)
    rows = {}
    for px in (int(p) for p in args.px.split(",")):
        x = torch.randn(batch, 10, px, px, device=device)

        def step(x: torch.Tensor = x) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out = embed(x)
            out.float().sum().backward()

        res = {}
        for as_matmul in (True, False):
            LinearPatchEmbed.as_matmul = as_matmul
            res["matmul_ms" if as_matmul else "convolution_ms"] = round(time_ms(step, args.reps, cuda), 3)
        LinearPatchEmbed.as_matmul = True
        res["ratio"] = round(res["convolution_ms"] / res["matmul_ms"], 2)
        rows[f"{batch}x10x{px}x{px}"] = res
        print(device.type, f"{batch} x 10 x {px}^2", res, flush=True)
    return rows


if __name__ == "__main__":
    main()
