"""One optimizer step on the device, as the training loop, the benchmarks and the GPU tests run it.

:class:`TrainStep` turns a batch (as :class:`deo.data.loader.ShardLoader` yields it) into one optimizer
step: tiles to the device, true-colour fill and multi-crop views, the task under autocast (EMA teacher,
frozen DINOv3, student, losses), backward, total-norm clipping, AdamW with this step's lr and weight
decay, EMA update. It returns each loss term, detached, still on the device (no host sync).

With ``train.cuda_graph`` the step is recorded once as a CUDA graph (:class:`StepGraph`) after
:data:`WARMUP_STEPS` eager steps, and replayed from then on: the host copies the batch, the
augmentation parameters and the schedule values into static buffers and launches one graph instead of
thousands of kernels (bench/RESULTS.md: the eager H100 step spent about 29 ms per step launching about
7,000 kernels). Everything a replay must see change is a device tensor read inside the graph: the
schedule's lr, ``lr * weight decay`` and ``1 - EMA momentum``, each computed on the host in float64 (a
Python float would be frozen at capture; ``1 - x`` in float32 would round small decays away), and
AdamW's decoupled weight decay, applied by this step as ``p -= (lr * wd) * p`` to the parameters with a
gradient (what the fused AdamW kernel does, which takes the decay as a float only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from deo import dist
from deo.data.loader import fill_true_colour
from deo.train import parallel

WARMUP_STEPS = 3
"""Eager steps before the graph is recorded: compiled regions compile, cuBLAS / cuDNN initialise and
pick their kernels, AdamW creates its state, all outside the graph (as PyTorch's whole-network capture
recipe does)."""


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` (None: fp32, no autocast)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _no_mark(label: str) -> None:
    """The default phase mark: nothing (the benchmarks pass a clock)."""


class TrainStep:
    """One optimizer step of the training loop: eager, or replayed from a CUDA graph (``train.cuda_graph``).

    Args:
        task: :class:`deo.train.task.DEOTask` (already distributed, compiled as configured).
        augment: :class:`deo.data.multicrop.MultiCrop`.
        optimizer: AdamW of :func:`deo.train.loop.build_optimizer` (groups carry ``apply_wd``).
        cfg: the ``PretrainConfig``.
        device: where the step runs.
        mark: called with a phase label after each phase of an eager step (``h2d``, ``augment``,
            ``first_pass`` under gradient accumulation, ``student_fwd``, ``backward``, ``optimizer_ema``);
            the benchmarks pass their clock.

    Raises:
        ValueError: ``train.cuda_graph`` off a CUDA device, or with more than one worker.
    """

    def __init__(self, task: Any, augment: Any, optimizer: torch.optim.Optimizer, cfg: Any,
                 device: torch.device, mark: Callable[[str], None] | None = None) -> None:
        self.task, self.augment, self.optimizer, self.cfg, self.device = task, augment, optimizer, cfg, device
        augment.to(device)
        self.amp = autocast_dtype(cfg.train.precision, device)
        # enabled for fp16 only; the loop checkpoints and restores its state
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.mark = mark or _no_mark
        self.eager_steps = 0
        self.graph: StepGraph | None = None
        if cfg.train.cuda_graph:
            if device.type != "cuda":
                raise ValueError(f"train.cuda_graph=true records a CUDA graph: it needs a CUDA device, got "
                                 f"{device} (set scaling.use_gpu=true, or train.cuda_graph=false)")
            if dist.get_world_size() > 1:
                raise ValueError(f"train.cuda_graph=true runs on one GPU; this run has "
                                 f"{dist.get_world_size()} workers (DDP's all-reduce inside the graph is not "
                                 "supported yet): set scaling.num_workers=1 or train.cuda_graph=false")
            self.graph = StepGraph(self.graph_body, device)

    def __call__(self, batch: dict[str, torch.Tensor], ids: list[str], epoch: int, step: int,
                 schedule: tuple[float, float, float]) -> dict[str, torch.Tensor]:
        """Run one optimizer step.

        Args:
            batch: ``ms`` (B, 10, S, S) uint16, ``optical`` (B, 3, A, A) uint8, ``has_optical`` (B,) bool,
                ``ms_gsd`` (B,) float32, and ``sar`` (B, 2, S, S) with ``model.sar``: host (pinned tensors
                are copied without blocking) or device tensors.
            ids: the B sample ids (they seed the augmentation).
            epoch: data epoch (seeds the augmentation).
            step: optimizer step (error messages).
            schedule: (lr, weight decay, EMA momentum) of this step.

        Returns:
            Each loss term's mean over the micro-steps: detached float32 scalars on the device. Under
            ``train.cuda_graph`` they are the graph's output buffers, overwritten by the next step.
        """
        lr, wd, _ = schedule
        for g in self.optimizer.param_groups:  # also what a checkpoint records under the graph
            g["lr"] = lr
            g["weight_decay"] = wd if g["apply_wd"] else 0.0
        if self.graph is None:
            return self._eager(batch, ids, epoch, step, schedule)
        if not self.replays_next:
            side = self.graph.side_stream  # warm-up off the default stream, as the capture recipe asks
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self._eager(batch, ids, epoch, step, schedule)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return out
        return self.graph(self.graph_inputs(batch, ids, epoch, schedule))

    @property
    def replays_next(self) -> bool:
        """Whether the next call replays the CUDA graph (``train.cuda_graph``, after the warm-up)."""
        return self.graph is not None and self.eager_steps >= WARMUP_STEPS

    def _eager(self, batch: dict[str, torch.Tensor], ids: list[str], epoch: int, step: int,
               schedule: tuple[float, float, float]) -> dict[str, torch.Tensor]:
        """The step as PyTorch runs it op by op (grad accumulation and the fp16 scaler included)."""
        cfg, task = self.cfg, self.task
        accum = cfg.train.grad_accum
        self.eager_steps += 1
        if cfg.train.compile_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self.mark("h2d")
        optical = fill_true_colour(batch["ms"], batch["optical"], batch["has_optical"], self.augment.true_colour_max)
        micro = len(ids) // accum
        sums: dict[str, torch.Tensor] = {}
        task.train()

        def views_of(m: int) -> dict[str, torch.Tensor]:
            part = slice(m * micro, (m + 1) * micro)
            return self.augment(batch["ms"][part], optical[part], ids[part], epoch, batch["ms_gsd"][part],
                                sar=batch["sar"][part] if cfg.model.sar else None)

        # R covers the whole step's batch: a first pass gives each micro-batch the others' Z^T Z
        shares: list[Any] = [None] * accum
        micro_views = None
        if accum > 1 and cfg.loss.gamma > 0:
            micro_views = [views_of(m) for m in range(accum)]
            self.mark("augment")
            with self._autocast():
                shares = task.share_micro_batches(micro_views)
            self.mark("first_pass")
        for m in range(accum):
            if micro_views is None:
                views = views_of(m)
                self.mark("augment")
            else:  # handed over: this micro-batch's views and teacher outputs are freed after its backward
                views, micro_views[m] = micro_views[m], None
            share, shares[m] = shares[m], None
            with parallel.no_grad_sync(task.trainable, skip=m < accum - 1):
                # the warm-up before a capture autocasts as the capture does: compiled regions see one state
                with self._autocast(cache_enabled=self.graph is None):
                    losses = task(views, step, share)
                self.mark("student_fwd")
                self.scaler.scale(losses["loss"] / accum).backward()
                self.mark("backward")
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach().float() / accum
            del views, share, losses
        if cfg.train.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(task.trainable.parameters(), cfg.train.clip_grad, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        task.update_ema(schedule[2])
        self.mark("optimizer_ema")
        return sums

    def _autocast(self, cache_enabled: bool = True) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None,
                              cache_enabled=cache_enabled)

    def graph_inputs(self, batch: dict[str, torch.Tensor], ids: list[str], epoch: int,
                     schedule: tuple[float, float, float]) -> dict[str, torch.Tensor]:
        """Everything one step reads that changes from step to step, as host tensors for :meth:`graph_body`.

        ``tile.<key>``: the batch; ``aug.<key>``: :meth:`MultiCrop.params` of the ids (drawn on the host
        from per-sample seeds, as in the eager step); ``schedule``: float32 (3,) lr, lr x weight decay
        and 1 - momentum, each computed in float64 first.
        """
        lr, wd, momentum = schedule
        inputs = {f"tile.{k}": v for k, v in batch.items() if k != "sar" or self.cfg.model.sar}
        inputs.update({f"aug.{k}": v for k, v in self.augment.params(ids, epoch).items()})
        inputs["schedule"] = torch.tensor([lr, lr * wd, 1.0 - momentum], dtype=torch.float32)
        return inputs

    def graph_forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The forward half of :meth:`graph_body`: views from the tiles and augmentation parameters, then
        the task's loss terms (with graph)."""
        tiles = {k.removeprefix("tile."): v for k, v in inputs.items() if k.startswith("tile.")}
        params = {k.removeprefix("aug."): v for k, v in inputs.items() if k.startswith("aug.")}
        optical = fill_true_colour(tiles["ms"], tiles["optical"], tiles["has_optical"], self.augment.true_colour_max)
        views = self.augment.apply(tiles["ms"], optical, params, tiles["ms_gsd"], sar=tiles.get("sar"))
        self.task.train()
        # no autocast weight cache: casts made during capture must not outlive it (PyTorch's CUDA-graph notes)
        with self._autocast(cache_enabled=False):
            return self.task(views, -1)

    def graph_body(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The step that :class:`StepGraph` records: all inputs on the device, no host sync, no
        step-dependent Python value (lr, decay and EMA weight come from ``inputs["schedule"]``).

        Run eagerly it is the same step as :meth:`_eager` (grad_accum 1, no scaler), up to rounding:
        tests/train/test_step.py compares the two on CPU.
        """
        losses = self.graph_forward(inputs)
        losses["loss"].backward()
        lr, lr_wd, ema_weight = inputs["schedule"].unbind()
        cfg, task = self.cfg, self.task
        if cfg.train.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(task.trainable.parameters(), cfg.train.clip_grad, foreach=True)
        groups = self.optimizer.param_groups
        saved = [(g["lr"], g["weight_decay"], g.get("capturable", False)) for g in groups]
        # AdamW's decoupled decay, before its update and only where it updates (a parameter with a grad)
        decayed = [dist.local_tensor(p) for g in groups if g["apply_wd"] for p in g["params"]
                   if p.grad is not None]
        with torch.no_grad():
            torch._foreach_sub_(decayed, torch._foreach_mul(decayed, lr_wd))
        for g in groups:  # AdamW reads lr from the device tensor; capturable: allowed inside a capture
            g["lr"], g["weight_decay"], g["capturable"] = lr, 0.0, lr.device.type == "cuda"
        try:
            self.optimizer.step()
        finally:
            for g, (g_lr, g_wd, g_cap) in zip(groups, saved, strict=True):
                g["lr"], g["weight_decay"], g["capturable"] = g_lr, g_wd, g_cap
        self.optimizer.zero_grad(set_to_none=True)
        task.update_ema(weight=ema_weight)
        return {k: v.detach().float() for k, v in losses.items()}


class StepGraph:
    """Record ``body(static inputs)`` once as a CUDA graph, then replay it for each call.

    The first call allocates a device buffer for each input and records ``body`` on them (recording
    runs no kernel), later calls copy their inputs into the same buffers (without blocking, from pinned
    memory) before the replay. Outputs are the recorded output tensors, overwritten by every replay.

    Args:
        body: maps a dict of device tensors to a dict of device tensors; it must not sync with the host.
        device: the CUDA device.
    """

    def __init__(self, body: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                 device: torch.device) -> None:
        self.body, self.device = body, device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: dict[str, torch.Tensor] = {}
        self.static_out: dict[str, torch.Tensor] = {}
        self.side_stream = torch.cuda.Stream(device)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy ``inputs`` into the graph's buffers and replay it (recording it at the first call).

        Raises:
            ValueError: an input's key, shape or dtype differs from the recorded ones.
        """
        if self.graph is None:
            self._record(inputs)
        self._copy_in(inputs)
        self.graph.replay()
        return self.static_out

    def _copy_in(self, inputs: dict[str, torch.Tensor]) -> None:
        if inputs.keys() != self.static_in.keys():
            raise ValueError(f"train.cuda_graph: this step's inputs {sorted(inputs)} differ from the recorded "
                             f"{sorted(self.static_in)}")
        for k, v in inputs.items():
            dst = self.static_in[k]
            if v.shape != dst.shape or v.dtype != dst.dtype:
                raise ValueError(f"train.cuda_graph: input {k} is {v.dtype} {tuple(v.shape)}, the graph was "
                                 f"recorded for {dst.dtype} {tuple(dst.shape)} (every step needs the same "
                                 "batch and tile sizes)")
            if v.device.type == "cpu" and not v.is_pinned():
                v = v.pin_memory()  # a copy from pageable memory would block the host
            dst.copy_(v, non_blocking=True)

    def _record(self, inputs: dict[str, torch.Tensor]) -> None:
        self.static_in = {k: torch.empty(v.shape, dtype=v.dtype, device=self.device) for k, v in inputs.items()}
        self._copy_in(inputs)
        torch.cuda.synchronize(self.device)
        # the warm-up steps' cached blocks go back to the driver: the graph allocates from its own pool
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the shard loader's threads keep pinning host memory while this thread records
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.static_out = self.body(self.static_in)
        except RuntimeError as e:
            raise RuntimeError(f"train.cuda_graph: recording the training step as a CUDA graph failed ({e}); "
                               "run with train.cuda_graph=false and report the error") from e
        self.graph = graph
