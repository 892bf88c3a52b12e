"""Time per training step, split into its parts, for the tiny config on CPU (real shard rows).

The step is the one of :func:`deo.train.loop.train` (augment on the device, task under autocast, backward,
total-norm clipping, AdamW, EMA update), run by :class:`TrainStep`, which :mod:`bench.gpu_step` reuses on
the GPU. Phase boundaries are marked with ``time.perf_counter`` on CPU and CUDA events on GPU
(:class:`PhaseClock`); the two teachers are timed by wrapping ``DEOTask._teachers`` and the DINOv3
teacher's ``forward`` on the instance, so the task itself runs unchanged.

Phases: ``h2d`` (tiles to the device), ``augment`` (true-colour fill + multi-crop), ``teacher_ema`` (EMA
MS teacher on the global views), ``teacher_dino`` (frozen DINOv3 on the optical global views),
``student_fwd`` (student, heads and losses), ``backward``, ``optimizer_ema`` (clip + AdamW + EMA).

    python pipelines/ingest.py output=/tmp/deo_step_shards use_ray=false
    python bench/step_bench.py --data /tmp/deo_step_shards [--steps 30] [--threads 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deo.config import build_config, read_yaml  # noqa: E402
from deo.data.multicrop import MultiCrop  # noqa: E402
from deo.train import parallel  # noqa: E402
from deo.train.config import PretrainConfig  # noqa: E402
from deo.train.loop import build_optimizer, configure_models  # noqa: E402
from deo.train.schedules import Schedules  # noqa: E402
from deo.train.step import TrainStep as LoopStep  # noqa: E402
from deo.train.task import DEOTask  # noqa: E402

PHASES = ("h2d", "augment", "teacher_ema", "teacher_dino", "student_fwd", "backward", "optimizer_ema")
"""Phases of an eager step, in execution order. A step replayed from its CUDA graph (``train.cuda_graph``)
has one phase, ``graph``. A step with ``train.grad_accum`` > 1 has ``first_pass`` after ``augment``
instead of the teacher phases: the teachers and the no-graph student forward of every micro-batch."""


class PhaseClock:
    """Named marks at phase ends; each interval is charged to the label of the mark that closes it.

    On CUDA a mark is a recorded event (no host sync); intervals are read once, after a synchronize, by
    :meth:`steps`. On CPU a mark is ``time.perf_counter()`` (the work is done when the call returns).
    """

    def __init__(self, device: torch.device) -> None:
        """Clock for ``device``."""
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any]] = []

    def mark(self, label: str) -> None:
        """Close the running interval and charge it to ``label`` (``"start"`` opens a new step).

        Nothing while a CUDA graph is being recorded (``train.cuda_graph``): that pass runs no kernel.
        """
        if self.cuda and torch.cuda.is_current_stream_capturing():
            return
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((label, ev))
        else:
            self.marks.append((label, time.perf_counter()))

    def clear(self) -> None:
        """Drop every mark."""
        self.marks = []

    def steps(self) -> list[dict[str, float]]:
        """Per step, milliseconds per phase label plus ``total`` (marks from one ``start`` to the next)."""
        if self.cuda:
            torch.cuda.synchronize()
        out: list[dict[str, float]] = []
        prev: Any = None
        for label, m in self.marks:
            if label == "start":
                if out:  # the gap between steps (host work of the loop) belongs to the previous step
                    out[-1]["total"] += self._ms(prev, m)
                    out[-1]["between"] = out[-1].get("between", 0.0) + self._ms(prev, m)
                out.append({"total": 0.0})
            else:
                dt = self._ms(prev, m)
                out[-1][label] = out[-1].get(label, 0.0) + dt
                out[-1]["total"] += dt
            prev = m
        return out

    def _ms(self, a: Any, b: Any) -> float:
        return float(a.elapsed_time(b)) if self.cuda else (b - a) * 1e3


class TrainStep:
    """One optimizer step of :func:`deo.train.loop.train` (:class:`deo.train.step.TrainStep`) with phase marks.

    Args:
        cfg: the pretraining config (student, teacher, views, train.compile / activation_checkpointing).
        device: where everything runs.
        stats: the manifest's band stats (for :class:`MultiCrop`).
        check_finite: the task's per-step finiteness check (one host sync per step). The training loop
            leaves it off and checks the summed terms at logging and checkpoint steps instead.
    """

    def __init__(self, cfg: PretrainConfig, device: torch.device, stats: dict[str, Any],
                 check_finite: bool = False, strategy: str = "") -> None:
        """Build task, augmentation, optimizer and schedules exactly as the training loop does."""
        torch.manual_seed(cfg.train.seed)
        self.cfg, self.device = cfg, device
        self.task = DEOTask(cfg, device=device, check_finite=check_finite)
        configure_models(self.task.trainable.student, cfg, ema_student=self.task.ema.module.student,
                         teacher=self.task.teacher)
        if strategy:
            parallel.distribute(self.task, strategy, device)
        self.augment = MultiCrop(cfg.views, stats=stats, seed=cfg.train.seed)
        self.optimizer = build_optimizer(self.task.trainable, cfg, device)
        self.schedules = Schedules.from_config(cfg.train)
        self.clock = PhaseClock(device)
        self._instrument()
        self.step = LoopStep(self.task, self.augment, self.optimizer, cfg, device, mark=self.clock.mark)

    def _instrument(self) -> None:
        """Mark the teachers' boundaries by wrapping two bound methods on the instances."""
        task, clock = self.task, self.clock
        teachers = task._teachers

        share = task.share_micro_batches
        in_first_pass = False

        def timed_share(micro_views: list[dict[str, torch.Tensor]]) -> list[Any]:
            nonlocal in_first_pass
            in_first_pass = True  # the whole first pass is one phase, closed by the step's mark
            try:
                return share(micro_views)
            finally:
                in_first_pass = False

        def timed_teachers(views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = teachers(views)
            if not in_first_pass:
                clock.mark("teacher_ema")
            return out

        task.share_micro_batches = timed_share  # type: ignore[method-assign]
        task._teachers = timed_teachers  # type: ignore[method-assign]
        if task.teacher is not None:
            dino = task.teacher.forward

            def timed_dino(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
                if in_first_pass:
                    return dino(x)
                clock.mark("teacher_ema")  # EMA teacher (and the task's prologue) ran before
                out = dino(x)
                clock.mark("teacher_dino")
                return out

            task.teacher.forward = timed_dino  # type: ignore[method-assign]

    def trainable_parameters(self) -> int:
        """Parameters that get gradients (student, embeddings, heads)."""
        return sum(p.numel() for p in self.task.trainable.parameters() if p.requires_grad)

    def __call__(self, batch: dict[str, torch.Tensor], ids: list[str], step: int, epoch: int = 0
                 ) -> dict[str, torch.Tensor]:
        """Run one step on a host (or device) batch as the loader yields it.

        Args:
            batch: ``ms`` uint16 (B, 10, S, S), ``optical`` uint8 (B, 3, A, A), ``has_optical`` bool (B,),
                ``ms_gsd`` float32 (B,); pinned host tensors are shipped non-blocking.
            ids: B sample ids (seed the augmentation).
            step: optimizer step (schedules, error messages).
            epoch: data epoch (seeds the augmentation).

        Returns:
            The task's loss dict (``loss`` detached).
        """
        self.clock.mark("start")
        graphed = self.step.replays_next
        out = self.step(batch, ids, epoch, step, self.schedules.at(step))
        if graphed:
            self.clock.mark("graph")
        return out


def emit(report: dict[str, Any], out: str) -> None:
    """Print a benchmark's JSON report and, given ``out``, write it there too."""
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        Path(out).write_text(text)


def summarise(steps: list[dict[str, float]], batch_size: int) -> dict[str, Any]:
    """Median ms per phase and per step, share of each phase in the summed medians, samples/s."""
    keys = [k for k in (*PHASES, "first_pass", "graph", "between") if any(k in s for s in steps)]
    med = {k: statistics.median(s.get(k, 0.0) for s in steps) for k in keys}
    total = [s["total"] for s in steps]
    mean_ms = sum(total) / len(total)
    return {
        "steps": len(steps),
        "step_ms_median": statistics.median(total),
        "step_ms_mean": mean_ms,
        "samples_per_s": batch_size * 1e3 / mean_ms,
        "split_ms_median": med,
        "split_frac": {k: v / max(sum(med.values()), 1e-9) for k, v in med.items()},
    }


def shard_batches(uri: str, batch_size: int, count: int) -> list[tuple[dict[str, torch.Tensor], list[str]]]:
    """``count`` batches of real rows with an MS tile (rows reused cyclically), as the loader yields them."""
    from deo.io.shards import ShardDataset

    ds = ShardDataset.open(uri)
    rows: dict[str, list[Any]] = {"ms": [], "optical": [], "has_optical": [], "ms_gsd": [], "sample_id": []}
    for b in ds.iter_batches(batch_size=256, columns=["sample_id", "ms", "optical", "ms_gsd"]):
        keep = b["has_ms"]
        for k in rows:
            rows[k].extend(list(b[k][keep]))
    n = len(rows["ms"])
    if n == 0:
        raise ValueError(f"{uri} has no row with an MS tile")
    out = []
    for i in range(count):
        idx = [(i * batch_size + j) % n for j in range(batch_size)]
        batch = {k: torch.as_tensor(np.stack([rows[k][j] for j in idx]))
                 for k in ("ms", "optical", "has_optical", "ms_gsd")}
        out.append((batch, [f"{rows['sample_id'][j]}:{i}" for j in idx]))
    return out


def main() -> None:
    """Parse arguments, time the steps, print a JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/tmp/deo_step_shards", help="ingested shards (pipelines/ingest.py output)")
    ap.add_argument("--config", default=str(REPO / "configs/pretrain/default.yaml"))
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--out", default="", help="also write the JSON summary here")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = build_config(PretrainConfig, read_yaml(args.config), ["scaling.num_workers=1", *args.overrides])
    from deo.io.shards import ShardDataset

    stats = ShardDataset.open(args.data).stats
    device = torch.device("cpu")
    t0 = time.perf_counter()
    runner = TrainStep(cfg, device, stats)
    build_s = time.perf_counter() - t0
    batches = shard_batches(args.data, cfg.train.batch_size, args.warmup + args.steps)
    for i, (b, ids) in enumerate(batches[: args.warmup]):
        runner(b, ids, i)
    runner.clock.clear()
    losses: dict[str, torch.Tensor] = {}
    for i, (b, ids) in enumerate(batches[args.warmup:]):
        losses = runner(b, ids, args.warmup + i)
    res = summarise(runner.clock.steps(), cfg.train.batch_size)
    med = res["split_ms_median"]
    res["grouped_ms_median"] = {
        "augment (incl. h2d)": med.get("h2d", 0) + med.get("augment", 0),
        "teachers (EMA + DINOv3)": med.get("teacher_ema", 0) + med.get("teacher_dino", 0),
        "student fwd+bwd (incl. losses)": med.get("student_fwd", 0) + med.get("backward", 0),
        "optimizer+EMA (incl. clip)": med.get("optimizer_ema", 0),
    }
    res.update({
        "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "student": cfg.model.student, "teacher": cfg.teacher.name, "batch": cfg.train.batch_size,
        "views": f"{cfg.views.n_global}x{cfg.views.global_size} + {cfg.views.n_local}x{cfg.views.local_size}",
        "tile_px": list(batches[0][0]["ms"].shape[-2:]), "data": args.data, "build_s": build_s,
        "trainable_params": runner.trainable_parameters(),
        "final_losses": {k: float(v) for k, v in losses.items()},
    })
    emit(res, args.out)


if __name__ == "__main__":
    main()
