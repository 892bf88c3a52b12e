"""ASHA vs running every trial to completion: wall time of the same sweep, side by side in one run.

Both sweeps use the same 4 grid trials (loss.alpha1 x loss.gamma), the same tiny pretraining and the same
local Ray; only ``scheduler`` differs (asha vs fifo). Also reports the best probe/knn_avg each found.

    python bench/sweep_bench.py [--steps 40] [key=value ...]   (SweepConfig overrides)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deo.config import build_config, read_yaml  # noqa: E402
from deo.tune.config import SweepConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from deo.tune.sweep import run_sweep

    storage = tempfile.mkdtemp(prefix="deo-sweep-bench-")
    probe = f"{REPO}/data/samples/eurosat_probe.csv"
    shared = REPO.parent / "shared" / "data" / "eurosat_ms"
    if shared.exists():
        probe = str(shared)  # 216 labelled tiles: a less coarse metric than the 40 committed ones
    every = max(args.steps // 4, 1)
    base = read_yaml(REPO / "configs/sweep/alpha_gamma.yaml")
    out = {}
    for scheduler in ("asha", "fifo"):
        cfg = build_config(SweepConfig, base, [
            f"storage={storage}", f"name={scheduler}", f"scheduler={scheduler}", "num_samples=1",
            "space={loss.alpha1: {type: grid, values: [0.0, 1.0]}, loss.gamma: {type: grid, values: [0.25, 1.0]}}",
            f"overrides=[train.max_steps={args.steps},probe.every={every},run.checkpoint_every={every},"
            f"run.report_every={every},run.log_every={every},run.export=false,run.tensorboard=false,"
            f"train.batch_size=8,views.n_local=2,probe.dataset={probe}]",
            f"grace_period={every}", *args.overrides])
        t0 = time.perf_counter()
        result = run_sweep(cfg)
        wall = time.perf_counter() - t0
        steps = sum(int(r["steps"]) for r in result.rows)
        out[scheduler] = {
            "wall_s": round(wall, 1), "trials": len(result.rows), "total_steps": steps,
            "stopped_early": sum(r["status"] == "STOPPED" for r in result.rows),
            "best_knn_avg": result.best[cfg.metric] if result.best else None,
        }
        print(scheduler, json.dumps(out[scheduler]), flush=True)
    out["asha_over_fifo_wall"] = round(out["asha"]["wall_s"] / out["fifo"]["wall_s"], 3)
    out["asha_over_fifo_steps"] = round(out["asha"]["total_steps"] / out["fifo"]["total_steps"], 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
