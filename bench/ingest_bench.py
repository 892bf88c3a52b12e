"""Ingest benchmark: Ray Data vs a plain single-process rasterio loop, side by side on the same data.

    python bench/ingest_bench.py [--size 10980] [--ms-px 256] [--scenes 1] [--workdir /tmp/deo_ingest_bench]

1. Builds a full-size Sentinel-2 L2A tile (``--size`` px on the 10 m grid, 10 DEO bands + SCL as
   COGs) by nearest-upsampling the real decimated 29RKH tile of ../shared/data (x10: 1098 -> 10980).
2. Ingests it with the plain loop (``use_ray=false``, one process) and with Ray Data (all CPUs), each in
   a fresh subprocess, over the same windows, and reports tiles/s, tiles/s per core and the ratio.
   With ``--scenes N`` (N > 1) it then ingests N scenes in one run, as real ingests do: the tile and
   N - 1 hard-linked copies of it under other scene names (same pixels, separate sources and tiles),
   which spreads Ray's fixed start-up over more work.
3. Reports peak RSS: of the plain process, and of each Ray worker (max over its jobs, recorded by
   the job UDF), for the full-size tile and for the decimated tile, to show memory per worker does
   not grow with the scene.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rasterio

REPO = Path(__file__).resolve().parents[1]
L2A = REPO.parent / "shared/data/s2_l2a_tile/sentinel-s2-l2a-cogs/29/R/KH/2020/2/S2A_29RKH_20200219_0_L2A"
BANDS10 = ("B02", "B03", "B04", "B08")
BANDS20 = ("B05", "B06", "B07", "B8A", "B11", "B12", "SCL")


def build_full_tile(out: Path, size: int) -> Path:
    """Upsample the decimated tile to ``size`` px (10 m bands) as COGs; returns the scene folder."""
    scene = out / f"S2A_29RKH_20200219_0_L2A_{size}"
    if (scene / "SCL.tif").exists():
        return scene
    scene.mkdir(parents=True, exist_ok=True)
    for band in BANDS10 + BANDS20:
        with rasterio.open(L2A / f"{band}.tif") as src:
            target = size if band in BANDS10 else size // 2
            factor = -(-target // src.width)
            data = src.read(1)
            big = np.repeat(np.repeat(data, factor, 0), factor, 1)[:target, :target]
            profile = src.profile.copy()
            t = src.transform
            profile.update(driver="COG", width=target, height=target, blocksize=512, compress="deflate",
                           overviews="NONE", num_threads="ALL_CPUS",
                           transform=rasterio.Affine(t.a / factor, 0, t.c, 0, t.e / factor, t.f))
            for k in ("blockxsize", "blockysize", "tiled", "interleave"):
                profile.pop(k, None)
            with rasterio.open(scene / f"{band}.tif", "w", **profile) as dst:
                dst.write(big, 1)
        del big
    return scene


def scene_copies(scene: Path, n: int) -> list[Path]:
    """``scene`` and ``n - 1`` copies of it as hard links under other scene names."""
    copies = [scene]
    for i in range(1, n):
        copy = scene.with_name(f"{scene.name}_copy{i}")
        copy.mkdir(exist_ok=True)
        for f in scene.iterdir():
            if not (copy / f.name).exists():
                os.link(f, copy / f.name)
        copies.append(copy)
    return copies


def run_ingest(scenes: list[Path], out: Path, ms_px: int, use_ray: bool) -> dict:
    """One ingest in a fresh subprocess; returns its summary plus peak RSS figures."""
    code = f"""
import json, resource, sys, time
sys.path.insert(0, {str(REPO)!r})
from deo.config import build_config
from deo.ingest.config import IngestConfig
from deo.ingest.run import ingest
cfg = build_config(IngestConfig, overrides=["s2=[{",".join(map(str, scenes))}]", "aerial=[]", "output={out}",
    "tile.ms_px={ms_px}", "use_ray={str(use_ray).lower()}", "max_cloud=1.0", "max_nodata=1.0"])
t = time.perf_counter()
s = ingest(cfg, log=lambda _: None)
s["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("SUMMARY" + json.dumps(s))
"""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    subprocess.run(["rm", "-rf", str(out)], check=True)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    line = next(x for x in res.stdout.splitlines() if x.startswith("SUMMARY"))
    summary = json.loads(line[len("SUMMARY"):])
    parts = [json.loads(p.read_text()) for p in (out / "_parts").glob("*.json")]
    summary["worker_peak_rss_mb"] = max(p["worker_peak_rss_mb"] for p in parts)
    summary["job_seconds"] = sum(p["seconds"] for p in parts)
    summary["process_wall_s"] = wall
    return summary


def main() -> None:
    """Run the benchmark and print a JSON report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=10980)
    ap.add_argument("--ms-px", type=int, default=256)
    ap.add_argument("--scenes", type=int, default=1, help="also ingest this many full-size scenes in one run")
    ap.add_argument("--workdir", default="/tmp/deo_ingest_bench")
    args = ap.parse_args()
    work = Path(args.workdir)
    cpus = os.cpu_count() or 1
    t = time.perf_counter()
    full = build_full_tile(work, args.size)
    print(f"full-size tile ready in {time.perf_counter() - t:.0f} s: {full}", flush=True)
    report: dict = {"size": args.size, "ms_px": args.ms_px, "cpus": cpus}
    runs = [("full", [full]), ("decimated", [L2A])]
    if args.scenes > 1:
        runs.append((f"{args.scenes}_scenes", scene_copies(full, args.scenes)))
    for name, scenes in runs:
        for mode in ("plain", "ray"):
            s = run_ingest(scenes, work / f"out_{name}_{mode}", args.ms_px, mode == "ray")
            rows = s["counts"]["rows"]
            report[f"{name}_{mode}"] = {
                "tiles": rows, "seconds": s["seconds"], "tiles_per_s": rows / s["seconds"],
                "tiles_per_s_per_core": rows / s["seconds"] / (cpus if mode == "ray" else 1),
                "worker_peak_rss_mb": round(s["worker_peak_rss_mb"], 1),
                "driver_peak_rss_mb": round(s["driver_peak_rss_mb"], 1),
            }
            print(name, mode, json.dumps(report[f"{name}_{mode}"]), flush=True)
    for name, _ in runs:
        ray, plain = report[f"{name}_ray"], report[f"{name}_plain"]
        report[f"ratio_ray_vs_plain_per_core_{name}"] = ray["tiles_per_s_per_core"] / plain["tiles_per_s_per_core"]
        report[f"ratio_ray_vs_plain_total_{name}"] = ray["tiles_per_s"] / plain["tiles_per_s"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
