"""The training loop: the same code under Ray Train, in a plain process, and on the GPU machine.

It knows nothing of its launcher beyond :class:`deo.train.runtime.Runtime`. Per optimizer step: read
the lane's next batch (prefetched, uint16), run :class:`deo.train.step.TrainStep` on it (multi-crop
views on the device, the task under autocast, backprop, total-norm clipping, AdamW with the per-iteration
lr/wd, EMA update; eager or replayed from a CUDA graph), advance the data position. Host syncs
(``.item()``) happen only at logging and checkpoint steps.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from deo import dist
from deo.config import config_changes, to_dict, to_yaml
from deo.data.loader import ShardIndex, ShardLoader
from deo.data.sampling import DataPosition, batches_left, lane_streams
from deo.io import storage
from deo.io.shards import ShardDataset, manifest_gsd
from deo.train import checkpoint as ckpt
from deo.train import parallel
from deo.train.compile_cache import CompileCache
from deo.train.config import PretrainConfig
from deo.train.metrics import MetricsLog, progress_line
from deo.train.runtime import Runtime
from deo.train.schedules import Schedules
from deo.train.step import TrainStep


@dataclass
class TrainSummary:
    """What a finished (or resumed-and-finished) run reports."""

    run_uri: str
    steps: int
    start_step: int
    final_losses: dict[str, float] = field(default_factory=dict)
    images_per_s: float = 0.0
    data_wait: float = 0.0
    seconds: float = 0.0
    backbone: str = ""


def build_optimizer(trainable: torch.nn.Module, cfg: PretrainConfig, device: torch.device,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with two groups: weights (decayed) and biases/norms/tokens (not decayed).

    ``fused`` (default: on CUDA) runs one kernel per parameter group and no host sync.
    """
    decay, no_decay = [], []
    for name, p in trainable.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay, "apply_wd": True},
        {"params": no_decay, "weight_decay": 0.0, "apply_wd": False},
    ]
    fused = device.type == "cuda" if fused is None else fused
    return torch.optim.AdamW(groups, lr=cfg.train.peak_lr, betas=(0.9, 0.999), fused=fused)


def configure_models(student: torch.nn.Module, cfg: PretrainConfig, backend: str = "inductor",
                     ema_student: torch.nn.Module | None = None,
                     teacher: torch.nn.Module | None = None) -> None:
    """Memory mode (activation checkpointing) and regional compilation (``train.compile``).

    Compiling region by region compiles a handful of distinct graphs, where compiling the whole student
    did not finish its first step in minutes (issue 10). The regions are the Swin blocks and patch
    mergings of the student and of the EMA teacher (``ema_student``: forward-only graphs), and the
    blocks of the frozen DINOv3 ``teacher`` (one forward-only graph for all of them; its float32 RoPE
    and token concatenations were the largest non-matmul costs of the eager teacher). Blocks of one
    stage and shift share their graphs (:class:`deo.models.swin_window.StochasticDepth`): 8 per crop
    size for any Swin depth. ``train.compile_mode`` is passed to Inductor (other backends take none).
    """
    if cfg.train.activation_checkpointing:
        student.swin.set_grad_checkpointing(True)
    if cfg.train.compile:
        import torch._dynamo

        # (stage, shift, crop size, grad mode) graphs: above Dynamo's default limit of 8 per code object
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        mode = {"mode": cfg.train.compile_mode}
        if backend != "inductor" or cfg.train.compile_mode == "default":
            mode = {}  # torch.compile takes a backend or a mode, not both
        for region in compiled_regions(student, ema_student, teacher):
            region.compile(backend=backend, dynamic=False, **mode)


def compiled_regions(*modules: torch.nn.Module | None) -> list[torch.nn.Module]:
    """The submodules of ``modules`` that ``train.compile`` compiles one by one (see configure_models)."""
    from timm.models.eva import EvaBlock
    from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock

    kinds = (SwinTransformerBlock, PatchMerging, EvaBlock)
    return [m for module in modules if module is not None for m in module.modules() if isinstance(m, kinds)]


def record_config_changes(run_uri: str, cfg: PretrainConfig, step: int) -> list[str]:
    """A resume under another config (a longer run, other weights, more workers): say what changed,
    keep the run's previous config.yaml as ``config.until_step_<step>.yaml`` and write the new one."""
    uri = storage.join(run_uri, "config.yaml")
    if not storage.exists(uri):
        return []
    before = storage.read_text(uri)
    changes = config_changes(before, cfg)
    if changes:
        kept = f"config.until_step_{step:08d}.yaml"
        if not storage.exists(storage.join(run_uri, kept)):  # a second change from this step: the first
            storage.write_text(storage.join(run_uri, kept), before)  # config trained up to it
        storage.write_text(uri, to_yaml(cfg))
        print(f"the config differs from the run's at step {step}; it trains on under the new one "
              f"(the old one kept as {kept}):\n  " + "\n  ".join(changes), flush=True)
    return changes


def train(cfg: PretrainConfig, runtime: Runtime, run_uri: str) -> TrainSummary:
    """Run (or resume) pretraining until ``train.max_steps``; rank 0 writes the run folder.

    Raises:
        FloatingPointError: a loss term is NaN/Inf (names the term and the steps it averaged).
    """
    from deo.data.multicrop import MultiCrop
    from deo.models.student import build_student
    from deo.train.task import DEOTask

    device = runtime.device
    rank, world = runtime.rank, runtime.world_size
    if device.type == "cpu":  # Ray sets OMP_NUM_THREADS=1; use the CPUs reserved for this worker
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    main = rank == 0
    B = cfg.train.batch_size
    if B % (world * cfg.train.grad_accum):
        raise ValueError(f"train.batch_size={B} not divisible by {world} workers x grad_accum")
    per_rank = B // world

    shards = ShardDataset.open(cfg.data)
    stats = shards.stats
    gsd = manifest_gsd(shards.manifest)  # (median, [min, max]) per modality, recorded with the weights
    index = ShardIndex.build(cfg.data, shards.files, with_sar=cfg.model.sar)

    # Identical init on every rank (DDP also broadcasts; FSDP shards each rank's identical copy).
    torch.manual_seed(cfg.train.seed)
    # finiteness is checked on the window's summed terms at logging and checkpoint steps, not per step:
    # a per-step check is a host sync (2 % of an H100 step, bench/RESULTS.md)
    task = DEOTask(cfg, device=device, check_finite=False)
    torch.manual_seed(ckpt.rank_seed(cfg.train.seed, dist.get_rank()))  # then each rank its own masks
    configure_models(task.trainable.student, cfg, ema_student=task.ema.module.student,
                     teacher=task.teacher)
    compiled = CompileCache.for_run(cfg.train.compile_cache, run_uri, device) if cfg.train.compile else None
    if compiled is not None:
        seconds = compiled.load()
        if main and (compiled.loaded or compiled.skipped):
            print(f"compile cache: loaded {len(compiled.loaded)} bundle(s) from {compiled.folder} in "
                  f"{seconds:.1f} s" + (f", skipped {len(compiled.skipped)} unreadable" if compiled.skipped
                                        else ""), flush=True)
    parallel.distribute(task, cfg.scaling.strategy, device)
    whole = parallel.WholeStudent(lambda: build_student(cfg.model, cfg.views.global_size).to(device))
    augment = MultiCrop(cfg.views, stats=stats, seed=cfg.train.seed)
    optimizer = build_optimizer(task.trainable, cfg, device)  # after distribute: FSDP replaces parameters
    train_step = TrainStep(task, augment, optimizer, cfg, device)  # its fp16 scaler is checkpointed below
    schedules = Schedules.from_config(cfg.train)
    decode_threads = cfg.train.loader_threads or max(1, min(8, int(cfg.scaling.cpus_per_worker) // 2))

    step, position = 0, DataPosition()
    state = runtime.restore()
    if state is not None:
        parallel.load_full_state_dict(task.trainable, state["trainable"])
        parallel.load_full_state_dict(task.ema, state["ema"])
        if "optical_teacher" in state and task.teacher is not None:
            task.teacher.load_state_dict(state["optical_teacher"])
        parallel.load_optimizer_state(task.trainable, optimizer, state["optimizer"])
        train_step.scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        position = DataPosition.from_dict(state["data_position"])
        ckpt.restore_rng(state, cfg.train.seed, step)
    start_step = step

    log = MetricsLog(run_uri, step, cfg.run.tensorboard, cfg.run.mlflow_uri) if main else None
    try:
        probe = None
        if main and cfg.probe.every:
            from deo.eval.in_loop_probe import build_knn_probe

            probe = build_knn_probe(cfg.probe, stats, seed=cfg.train.seed)
        probe_metrics: dict[str, float] = {}
        if main and step == 0:
            storage.write_text(storage.join(run_uri, "config.yaml"), to_yaml(cfg))
            storage.write_text(storage.join(run_uri, "manifest.json"), json.dumps(shards.manifest, indent=1))
        if main and step > 0:
            print(f"resuming {run_uri} at step {step} (epoch {position.epoch}, "
                  f"{position.samples} samples into it)", flush=True)
            record_config_changes(run_uri, cfg, step)

        started = time.perf_counter()
        window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
        total_wait = 0.0
        sums: dict[str, torch.Tensor] = {}
        last: dict[str, float] = {}
        images_per_s = 0.0
        while step < cfg.train.max_steps:
            lanes = lane_streams(index.units, cfg.train.seed, position.epoch, B, world,
                                 position.segments, cfg.train.shuffle_buffer, cfg.train.data_order)
            n = min(batches_left(lanes, B), cfg.train.max_steps - step)
            if n == 0:
                if position.samples == 0:
                    raise ValueError(f"{cfg.data} has {index.num_rows} trainable rows, fewer than one "
                                     f"global batch of {B} over {world} workers")
                position.next_epoch()
                continue
            loader = ShardLoader(index, lanes[rank], per_rank, n, pin_memory=device.type == "cuda",
                                 decode_threads=decode_threads)
            wait_before = 0.0
            for batch in loader:
                wait_now = loader.wait_seconds - wait_before
                wait_before = loader.wait_seconds
                window_wait += wait_now
                total_wait += wait_now
                lr, wd, momentum = schedules.at(step)
                ids = batch.pop("sample_id")
                losses = train_step(batch, ids, position.epoch, step, (lr, wd, momentum))
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0) + v
                step += 1
                window_steps += 1
                position.advance(world, B)
                at_checkpoint = step % cfg.run.checkpoint_every == 0 or step == cfg.train.max_steps
                if compiled is not None and main and (step == start_step + 1 or at_checkpoint):
                    saved = compiled.save()  # what this process compiled since the last save, if anything
                    if saved:
                        print(f"compile cache: saved {saved}", flush=True)

                if step % cfg.run.log_every == 0 or step == cfg.train.max_steps:
                    last = _window_means(sums, window_steps, step)
                    elapsed = time.perf_counter() - window_start
                    images_per_s = window_steps * B / max(elapsed, 1e-9)
                    # on the device: NCCL (GPU workers) reduces no CPU tensors
                    wait_frac = float(dist.all_reduce_mean(
                        torch.tensor(window_wait / max(elapsed, 1e-9), device=device)))
                    record = {"step": step, "epoch": position.epoch, **last, "lr": lr, "weight_decay": wd,
                              "momentum": momentum, "images_per_s": images_per_s, "data_wait": wait_frac}
                    if log is not None:
                        log.log(record)
                        print(progress_line(step, cfg.train.max_steps, last, lr, images_per_s, wait_frac,
                                            started, start_step), flush=True)
                    sums, window_steps, window_wait = {}, 0, 0.0
                    window_start = time.perf_counter()
                    if step % cfg.run.report_every == 0 and step % cfg.run.checkpoint_every \
                            and not (cfg.probe.every and step % cfg.probe.every == 0):
                        runtime.report({**record, **probe_metrics})

                if cfg.probe.every and (step % cfg.probe.every == 0 or step == cfg.train.max_steps):
                    student = whole(task)  # a collective under FSDP: every rank gathers
                    if probe is not None:  # rank 0 only; the other ranks wait at the next collective
                        probe_metrics = probe(student, device)
                    if log is not None:
                        log.log_probe({"step": step, **probe_metrics})
                        print(f"step {step} probe: " + " ".join(f"{k}={v:.4f}" for k, v in
                                                              probe_metrics.items()), flush=True)
                if cfg.probe.every and step % cfg.probe.every == 0 and step % cfg.run.checkpoint_every \
                        and step != cfg.train.max_steps:
                    runtime.report({"step": step, "epoch": position.epoch, **last, **probe_metrics})
                if at_checkpoint:
                    if sums:  # steps since the last logging step: never checkpoint non-finite weights
                        _window_means(sums, window_steps, step)
                    state_out = _checkpoint_state(task, optimizer, train_step.scaler, step, position, cfg, stats,
                                                  shards.manifest["bands"], gsd)
                    if log is not None:
                        log.flush()
                    runtime.save(state_out, {"step": step, "epoch": position.epoch, **last, **probe_metrics},
                                 step)
            if n == batches_left(lanes, B):  # the lane was read to its end: next epoch
                position.next_epoch()

        seconds = time.perf_counter() - started
        if step == start_step and log is not None and log.lines:
            # nothing left to train (stopped after the last checkpoint, before the summary): report the
            # run's last logged values rather than none
            final = log.lines[-1]
            not_losses = {"step", "epoch", "lr", "weight_decay", "momentum", "images_per_s", "data_wait"}
            last = {k: v for k, v in final.items() if k not in not_losses and not k.startswith("probe/")}
            images_per_s = float(final.get("images_per_s", 0.0))
        summary = TrainSummary(run_uri, step, start_step, last, images_per_s,
                               total_wait / max(seconds, 1e-9), seconds)
        final_student = whole(task) if cfg.run.export else None  # collective under FSDP
        if main:
            if final_student is not None:
                from deo.export import export_backbone

                summary.backbone = storage.join(run_uri, "backbone.safetensors")
                export_backbone(final_student, cfg, stats, shards.manifest["bands"], summary.backbone, step=step,
                                gsd=gsd[0], gsd_range=gsd[1], source=storage.join(run_uri, ckpt.checkpoint_name(step)))
            if log is not None:
                log.close()
            storage.write_text(storage.join(run_uri, "summary.json"),
                               json.dumps(summary.__dict__, indent=1, default=str))
        # every rank returns once rank 0 has written the export and summary. Under FSDP the gather above is
        # the last collective, and a rank that exits right after it can abort: the gloo group outlives
        # destroy_process_group (DTensor's sharding caches keep its mesh), and its worker thread, still
        # freeing the gather's tensors, needs the GIL of an interpreter that is shutting down (gdb:
        # ~AsyncAllgatherCoalescedWork -> THPVariable_dealloc -> take_gil -> PyThread_exit_thread -> terminate)
        dist.barrier()
        return summary
    except BaseException:
        if log is not None:  # a failed attempt leaves no temporary TensorBoard folder behind
            log.discard()
        raise


def _window_means(sums: dict[str, torch.Tensor], steps: int, step: int) -> dict[str, float]:
    """Mean of each loss term over the window's ``steps`` and all ranks (one host sync).

    Raises:
        FloatingPointError: a term is NaN/Inf in some step of the window, on some rank.
    """
    names = sorted(sums)
    vec = dist.all_reduce_mean(torch.stack([sums[k] for k in names]) / steps)
    means = {k: float(v) for k, v in zip(names, vec.tolist(), strict=True)}
    bad = [f"{k}={v}" for k, v in means.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(
            f"loss terms not finite in steps {step - steps + 1}..{step}: {', '.join(bad)} "
            "(means over those steps and all ranks)"
        )
    return means


def _check_weights_finite(task: Any, step: int) -> None:
    """Raise unless every trainable and EMA weight is finite on every rank (one host sync)."""
    params = [dist.local_tensor(p.detach()) for p in (*task.trainable.parameters(), *task.ema.parameters())]
    finite = torch.stack(torch._foreach_norm(params)).isfinite().all().float()
    if float(dist.all_reduce_mean(finite)) < 1.0:
        raise FloatingPointError(
            f"weights are not finite after step {step} (a NaN/Inf gradient reached the optimizer while "
            "the losses stayed finite); checkpoint not saved: a rerun resumes from the last good one"
        )


def _checkpoint_state(task: Any, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                      step: int, position: DataPosition, cfg: PretrainConfig, stats: dict,
                      bands: Any, gsd: tuple[dict, dict]) -> dict[str, Any] | None:
    """The checkpoint of this step on rank 0 (None elsewhere); every rank must call it (FSDP gathers).

    Raises:
        FloatingPointError: a weight is NaN/Inf (a non-finite gradient with finite losses reached the
            optimizer); nothing is saved, so a rerun resumes from the last good checkpoint.
    """
    _check_weights_finite(task, step)
    trainable = parallel.full_state_dict(task.trainable)
    ema = parallel.full_state_dict(task.ema)
    optim = parallel.full_optimizer_state(task.trainable, optimizer)
    rngs = ckpt.all_rng_states()
    if not dist.is_main_process():
        return None
    state = {
        "student": {k.removeprefix("student."): v for k, v in trainable.items() if k.startswith("student.")},
        "trainable": trainable,
        "ema": ema,
        "optimizer": optim,
        "scaler": scaler.state_dict(),
        "step": step,
        "data_position": position.to_dict(),
        "rng_per_rank": rngs,
        "config": to_dict(cfg),
        "stats": stats,
        "bands": bands,
        "gsd": gsd[0],
        "gsd_range": gsd[1],
    }
    if not cfg.teacher.weights and task.teacher is not None:
        state["optical_teacher"] = task.teacher.state_dict()
    return state
