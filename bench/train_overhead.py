"""Ray Train overhead: steps/s of the Ray Train path vs the plain single-process loop, side by side.

Both run :func:`deo.train.loop.train` with the same config, model, batch and shards; the plain one uses
:class:`deo.train.runtime.LocalRuntime` in this process, the Ray one a 1-worker TorchTrainer. Steady-state
throughput is read from each run's metrics.jsonl (the first logging window, which includes warm-up, is
dropped); fixed start-up costs (Ray start, worker group) are reported separately.

    python bench/train_overhead.py [--steps 60] [--repeats 2] [key=value ...]
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
from deo.io import storage  # noqa: E402
from deo.train.config import PretrainConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def steady_rate(run_uri: str) -> tuple[float, float]:
    """(images/s, data-wait) averaged over logging windows after the first."""
    lines = [json.loads(x) for x in storage.read_text(storage.join(run_uri, "metrics.jsonl")).splitlines()]
    tail = lines[1:] or lines
    return (sum(r["images_per_s"] for r in tail) / len(tail), sum(r["data_wait"] for r in tail) / len(tail))


def run_plain(cfg: PretrainConfig, run_uri: str) -> float:
    import torch

    from deo.train.loop import train
    from deo.train.runtime import LocalRuntime

    torch.set_num_threads(1)  # Ray Train workers get OMP_NUM_THREADS=1: compare like with like
    t0 = time.perf_counter()
    train(cfg, LocalRuntime(run_uri, device=torch.device("cpu")), run_uri)
    return time.perf_counter() - t0


def run_ray(cfg: PretrainConfig, run_uri: str) -> float:
    from deo.train.ray_glue import build_trainer

    t0 = time.perf_counter()
    result = build_trainer(cfg, run_uri).fit()
    if result.error:
        raise result.error
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    tmp = tempfile.mkdtemp(prefix="deo-bench-")
    base = read_yaml(REPO / "configs/pretrain/default.yaml")
    results = {"plain": [], "ray": []}
    walls = {"plain": [], "ray": []}
    for rep in range(args.repeats):
        for kind in ("plain", "ray"):  # interleaved so drift hits both
            cfg = build_config(PretrainConfig, base, [
                f"train.max_steps={args.steps}", "run.log_every=10", f"run.checkpoint_every={args.steps}",
                f"run.report_every={args.steps}", f"run.storage={tmp}", f"run.name={kind}{rep}",
                "run.export=false", "run.tensorboard=false", *args.overrides])
            uri = storage.join(tmp, cfg.run.name)
            wall = (run_plain if kind == "plain" else run_ray)(cfg, uri)
            rate, wait = steady_rate(uri)
            results[kind].append((rate, wait))
            walls[kind].append(wall)
            print(f"{kind:5s} rep {rep}: {rate:.2f} img/s steady, data-wait {100 * wait:.2f}%, "
                  f"wall {wall:.1f} s", flush=True)
    ray.shutdown()
    plain = sum(r for r, _ in results["plain"]) / args.repeats
    rayr = sum(r for r, _ in results["ray"]) / args.repeats
    out = {
        "steps": args.steps, "repeats": args.repeats, "batch_size": cfg.train.batch_size,
        "plain_images_per_s": plain, "ray_images_per_s": rayr, "ray_over_plain": rayr / plain,
        "ray_overhead_pct": 100 * (1 - rayr / plain),
        "data_wait_ray_pct": 100 * sum(w for _, w in results["ray"]) / args.repeats,
        "data_wait_plain_pct": 100 * sum(w for _, w in results["plain"]) / args.repeats,
        "ray_init_s": ray_start,
        "fit_fixed_cost_s": sum(walls["ray"]) / args.repeats - sum(walls["plain"]) / args.repeats,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
