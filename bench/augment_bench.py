"""Time the device half of the multi-crop augmentation (``MultiCrop.apply``) at a config's views.

Random uint16 MS and uint8 optical tiles (their values do not change the work), the config's view
sizes and counts, parameters drawn once; reports the median of ``--reps`` calls and the ops with most
self time. On the H100 this part took 13-15 ms of the reference step (bench/RESULTS.md); here it runs
on the CPU, for side-by-side comparisons of two versions of the code.

    python bench/augment_bench.py [--batch 8] [--reps 5] [--tile 256] [--config configs/pretrain/reference.yaml]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deo.config import build_config, read_yaml  # noqa: E402
from deo.data.multicrop import MultiCrop  # noqa: E402
from deo.train.config import PretrainConfig  # noqa: E402

from step_bench import emit  # noqa: E402

STATS = {"ms": {"mean": [1500.0] * 10, "std": [1000.0] * 10}, "optical": {"mean": [110.0] * 3, "std": [50.0] * 3}}


def main() -> None:
    """Time MultiCrop.apply and print a JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs/pretrain/reference.yaml"))
    ap.add_argument("--batch", type=int, default=8, help="tiles per call")
    ap.add_argument("--tile", type=int, default=256, help="tile side in pixels")
    ap.add_argument("--reps", type=int, default=5, help="timed calls (after one warm-up call)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="", help="also write the JSON report here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = build_config(PretrainConfig, read_yaml(args.config), ["data=unused", "teacher.weights="])
    g = torch.Generator().manual_seed(0)
    b, t = args.batch, args.tile
    ms = torch.randint(0, 10000, (b, 10, t, t), generator=g).to(torch.uint16)
    optical = torch.randint(0, 256, (b, 3, t, t), generator=g).to(torch.uint8)
    gsd = torch.full((b,), 10.0)
    augment = MultiCrop(cfg.views, STATS, seed=0).to(torch.device("cpu"))
    params = augment.params([f"s{i}" for i in range(b)], 0)
    augment.apply(ms, optical, params, gsd)
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        augment.apply(ms, optical, params, gsd)
        times.append((time.perf_counter() - t0) * 1e3)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        augment.apply(ms, optical, params, gsd)
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    emit({"command": "python bench/augment_bench.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
          "views": f"{cfg.views.n_global}x{cfg.views.global_size} + {cfg.views.n_local}x{cfg.views.local_size}",
          "batch": b, "tile": t, "threads": args.threads, "ms_median": round(statistics.median(times), 1),
          "ms_all": [round(x, 1) for x in times],
          "ops_per_call": sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")),
          "top_self_ms": {e.key: round(e.self_cpu_time_total / 1e3, 1) for e in top}}, args.out)


if __name__ == "__main__":
    main()
