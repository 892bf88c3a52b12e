"""FSDP vs DDP (``scaling.strategy``) on 2 gloo processes on CPU: memory held per rank and step time.

Each strategy runs the training step of :class:`step_bench.TrainStep` (the loop's step, with the task
made data-parallel by :func:`deo.train.parallel.distribute`) in 2 spawned processes, one after the other,
same config and synthetic uint16 tiles. Per rank it reports the bytes that persist between steps and
that FSDP shards: trainable parameters, their gradients (before ``zero_grad``), AdamW's two moments and
the EMA teacher; summed exactly from each rank's local tensors (``DTensor.to_local()``). Activations are
not sharded by either strategy (activation checkpointing is the lever for those). Step time is the
median over the timed steps of rank 0, so the ratio shows FSDP's extra all-gathers on this machine's
loopback gloo, not on NVLink/NCCL.

    python bench/fsdp_bench.py [--student swin_base_patch4_window7_224] [--steps 6] [--out fsdp.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from common import free_port  # noqa: E402

from deo.dist import local_tensor  # noqa: E402

STATS = {"ms": {"mean": [1500.0] * 10, "std": [1000.0] * 10}, "optical": {"mean": [110.0] * 3, "std": [50.0] * 3}}


def _bytes(tensors: Any) -> int:
    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors if t is not None)


def _rank(rank: int, world: int, port: int, strategy: str, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist
    from gpu_step import synthetic_batches

    from deo.config import build_config, read_yaml
    from deo.data.loader import fill_true_colour
    from deo.train.config import PretrainConfig

    from step_bench import REPO, TrainStep

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = build_config(PretrainConfig, read_yaml(REPO / "configs/pretrain/default.yaml"), [
        f"model.student={args.student}", "model.head_hidden=2048", "model.head_out=256",
        f"train.batch_size={args.batch * world}", "views.global_size=64", "views.local_size=32",
        "views.optical_global_size=64", f"views.n_local={args.n_local}", "model.drop_path=0.1", "data=unused",
    ])
    step = TrainStep(cfg, torch.device("cpu"), STATS, strategy=strategy)
    host = synthetic_batches(2, args.batch, 96, pin=False, seed=rank)
    times = []
    for i in range(args.warmup + args.steps):
        ids = [f"r{rank}s{i}b{j}" for j in range(args.batch)]
        t0 = time.perf_counter()
        step(host[i % 2], ids, i)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    # the step zeroes gradients at its end: one more forward/backward to count their bytes
    params = [p for p in step.task.trainable.parameters() if p.requires_grad]
    b = host[0]
    optical = fill_true_colour(b["ms"], b["optical"], b["has_optical"])
    step.task(step.augment(b["ms"], optical, [f"g{j}" for j in range(args.batch)], 0, b["ms_gsd"]), 0
              )["loss"].backward()
    record = {
        "strategy": strategy, "rank": rank,
        "params_mb": _bytes(params) / 1e6,
        "grads_mb": _bytes(p.grad for p in params) / 1e6,
        "adamw_mb": _bytes(t for st in step.optimizer.state.values() for t in st.values()
                           if torch.is_tensor(t) and t.ndim > 0) / 1e6,
        "ema_mb": _bytes(step.task.ema.parameters()) / 1e6,
        "step_s_median": statistics.median(times),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
        "trainable_params_m": sum(p.numel() for p in params) / 1e6,
    }
    Path(out, f"{strategy}.{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default="swin_base_patch4_window7_224")
    ap.add_argument("--batch", type=int, default=2, help="samples per rank")
    ap.add_argument("--n-local", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    import tempfile

    folder = tempfile.mkdtemp(prefix="fsdp-bench-")
    for strategy in ("ddp", "fsdp"):
        mp.start_processes(_rank, args=(2, free_port(), strategy, args, folder), nprocs=2, join=True,
                           start_method="spawn")
    rec = {f: json.loads(Path(folder, f).read_text()) for f in sorted(os.listdir(folder))}
    ddp, fsdp = rec["ddp.0.json"], rec["fsdp.0.json"]
    persist = ("params_mb", "grads_mb", "adamw_mb", "ema_mb")
    summary = {
        "command": "python bench/fsdp_bench.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
        "student": args.student, "world": 2, "per_rank": rec,
        "persistent_mb_rank0": {"ddp": sum(ddp[k] for k in persist), "fsdp": sum(fsdp[k] for k in persist)},
        "step_time_ratio_fsdp_over_ddp": fsdp["step_s_median"] / ddp["step_s_median"],
    }
    summary["persistent_ratio_fsdp_over_ddp"] = (
        summary["persistent_mb_rank0"]["fsdp"] / summary["persistent_mb_rank0"]["ddp"])
    from step_bench import emit

    emit(summary, args.out)


if __name__ == "__main__":
    main()
