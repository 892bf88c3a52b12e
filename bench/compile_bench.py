"""Regional compilation (``train.compile``): graphs compiled, warm-up time, step time, cold and warm cache.

Runs the loop's step (:class:`step_bench.TrainStep`) at a config's view sizes with a small batch, in
fresh subprocesses: ``eager`` (no compile), then ``compiled`` twice with one new Inductor cache folder,
so the first compiled run starts cold and the second finds the cache warm (as a resumed run or a second
worker on the same node would), then ``compiled_from_bundles``: a fresh local cache (another node) that
loads the bundles the cold run saved (``train.compile_cache``, :mod:`deo.train.compile_cache`). Per run: seconds of the first step (building included) and of the
first ``--warmup`` steps, median of the next ``--steps``, Dynamo's unique graphs and recompiles.

    python bench/compile_bench.py [--config configs/pretrain/reference.yaml] [--batch 2] [--device cpu]

To compare two versions of deo side by side, run it from each checkout (``git worktree``) in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def one_run(args: argparse.Namespace) -> dict:
    """Build and time the step in this process (``--child``)."""
    import torch
    from gpu_step import STATS, synthetic_batches
    from torch._dynamo.utils import counters

    from deo.config import build_config, read_yaml
    from deo.train.compile_cache import CompileCache
    from deo.train.config import PretrainConfig

    from step_bench import TrainStep

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    bundles = CompileCache(args.bundles) if args.bundles and args.compile else None
    load_s = bundles.load() if bundles is not None else 0.0
    cfg = build_config(PretrainConfig, read_yaml(args.config), [
        f"train.batch_size={args.batch}", "teacher.weights=", "scaling.num_workers=1", "data=unused",
        f"train.compile={'true' if args.compile else 'false'}",
        f"train.precision={'bf16' if device.type == 'cuda' else 'fp32'}", *args.overrides])
    t0 = time.perf_counter()
    step = TrainStep(cfg, device, STATS)
    host = synthetic_batches(1, args.batch, args.tile, pin=device.type == "cuda")
    times = []
    for i in range(args.warmup + args.steps):
        s0 = time.perf_counter()
        step(host[0], [f"s{i}_{j}" for j in range(args.batch)], i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - s0)
    saved = bundles.save() if bundles is not None else None
    return {
        "compile": args.compile, "first_step_s": round(times[0], 2),
        "bundles_loaded": len(bundles.loaded) if bundles is not None else 0, "bundle_load_s": round(load_s, 2),
        "bundle_saved": bool(saved),
        "fx_graph_cache": {k: v for k, v in counters["inductor"].items() if "cache" in k},
        "aot_autograd_cache": {k: v for k, v in counters["aot_autograd"].items() if "cache" in k},
        "build_and_warmup_s": round(time.perf_counter() - t0 - sum(times[args.warmup:]), 2),
        "warmup_steps_s": [round(t, 2) for t in times[: args.warmup]],
        "step_s_median": round(statistics.median(times[args.warmup:]), 4),
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
        "recompiles": sum(counters["recompiles"].values()) if counters["recompiles"] else 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(HERE.parent / "configs/pretrain/reference.yaml"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bundles", default="", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_run(args)))
        return
    cache = tempfile.mkdtemp(prefix="inductor-cache-")
    fresh = tempfile.mkdtemp(prefix="inductor-cache-")  # another machine: nothing compiled locally
    bundles = tempfile.mkdtemp(prefix="deo-compile-cache-")  # the run's train.compile_cache
    base = [sys.executable, __file__, "--child", f"--config={args.config}", f"--device={args.device}",
            f"--batch={args.batch}", f"--tile={args.tile}", f"--warmup={args.warmup}",
            f"--steps={args.steps}", f"--threads={args.threads}"]
    runs = {}
    for name, extra, local in (("eager", [], cache),
                               ("compiled_cold_cache", ["--compile", f"--bundles={bundles}"], cache),
                               ("compiled_warm_cache", ["--compile"], cache),
                               ("compiled_from_bundles", ["--compile", f"--bundles={bundles}"], fresh)):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=local)
        r = subprocess.run([*base, *extra, *args.overrides], env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
        runs[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(name, runs[name], flush=True)
    summary = {"command": "python bench/compile_bench.py " + " ".join(sys.argv[1:]), "runs": runs,
               "config": args.config, "overrides": args.overrides, "batch": args.batch}
    from step_bench import emit

    emit(summary, args.out)


if __name__ == "__main__":
    main()
