"""The GPU benchmark of the training step (issues 4 and 10): one prepared script for one H100.

Measures the project's full step (:class:`step_bench.TrainStep`, the step of ``deo.train.loop.train``):
uint16 MS + uint8 optical tiles (256 px) shipped from PINNED host memory with ``non_blocking`` each step
(as the shard loader hands them over), multi-crop on the GPU, the task under bf16 autocast (EMA teacher
on the 2 global MS views, frozen random DINOv3 on the 2 global optical views, student on all views,
losses), backward, total-norm clipping, fused AdamW, foreach EMA update. Per variant: samples/s, step
time (median and mean), time split from CUDA events, peak memory (``torch.cuda.max_memory_allocated``
over the timed steps, and over the whole variant), whether every loss term stayed finite over the timed
steps, and for the first variant the FLOPs of one step (``FlopCounterMode``: forward + backward of every
module, teachers included, augmentation excluded) and MFU = FLOPs / step time / peak (989 TFLOP/s dense
bf16, H100 SXM; ``--peak-tflops``).

Variants, in this order, or in the order ``--only`` names them (each in a forked child with a
wall-clock limit; the JSON is rewritten after each, so a timeout keeps what finished). The first
compiled variant of a run starts from empty Inductor and Triton caches (cold: its first step compiles,
and it saves what it compiled as a ``train.compile_cache`` bundle next to ``--out``); later ones reuse
those caches (warm), except ref_compile_bundles (``--keep-caches``: no variant starts cold):
  ref_eager        swin_tiny + ViT-B/16 DINOv3 [8, 11], 2x224 + 10x96, batch 64, bf16; FLOPs/MFU; a
                   torch.profiler table of the ops and kernels with most GPU time, and GPU busy time
  ref_unfused      ref_eager with timm's roll + window partition / reverse + roll and separate
                   stochastic-depth multiply and residual add (``AdaptiveWindowBlock.fused = False``)
  ref_fp32_ln      ref_unfused with autocast's float32 LayerNorms instead of ``InputDtypeLayerNorm``: the
                   step as it was before both changes
  ref_broadcast_bias ref_eager with the unshifted blocks' relative-position bias broadcast over the
                   windows, as before the fourth session (SDPA then took its math path for half the blocks)
  ref_repeat_bias  ref_eager with the window attention as before the sixth session (baseline): the bias
                   repeated with unaligned rows (SDPA pads a copy, autograd unpads it) and timm's permuted
                   q/k/v split (a stack and a permuted copy of the qkv gradient)
  ref_conv_embed   ref_eager with the patch embeddings as timm's strided convolution (cuDNN, with its NCHW ->
                   NHWC conversions), as before the eighth session's ``LinearPatchEmbed`` (baseline)
  ref_joint_trunk  ref_eager with the MS and optical views of each size in one pass through the shared
                   stages (bench/joint_trunk.py: half the trunk's kernel launches; an experiment)
  ref_check_finite ref_eager, then the same steps again WITH a per-step finiteness check (one host sync;
                   the loop checks the summed terms at logging steps instead)
  ref_loader       ref_eager fed by the real ``ShardLoader`` (pinned, ``--loader-threads`` decode threads)
                   from Parquet shards of random 256 px tiles written first on the machine's disk, never
                   re-reading a row: samples/s and data-wait, the share of the time the step waited on
                   the loader (issue 10: < 2 %)
  ref_compile      the same with ``train.compile=true`` (regional: Swin blocks and patch mergings of
                   student and EMA teacher, one graph per stage/shift/crop size, and DINOv3's blocks,
                   one graph), with a profile; skipped when the warm-up (compilation) exceeds
                   ``--compile-warmup-s``
  ref_compile_bundles ref_compile in a process with EMPTY Inductor and Triton caches that loads the
                   bundle of the run's cold variant first: a resumed run or restarted worker on another
                   machine
  ref_compile_warm ref_compile again, from the caches an earlier compiled variant filled (a resumed
                   run, or a second worker on the node)
  ref_graph        ref_eager with ``train.cuda_graph=true``: 3 eager steps, then the whole step recorded
                   once as a CUDA graph and replayed (no kernel launches from the host), with a profile
  ref_compile_graph ref_compile with ``train.cuda_graph=true`` (compiled regions inside the step's graph)
  ref_compile_graph_overlap ref_compile_graph with ``train.overlap_teachers=true``: the teachers on a second
                   stream, a parallel branch of the graph beside the student's forward (its phase split
                   is not meaningful: the teachers' marks sit on their own stream)
  ref_compile_augment ref_compile with the multi-crop augmentation (``MultiCrop.apply``, one graph)
                   compiled too: an experiment (13-15 ms uncompiled on the H100; on the 2-core CPU
                   Inductor's version was 1.9x slower than eager, so it is not in ``train.compile``)
  ref_compile_augment_graph ref_compile_graph with the augmentation compiled too (the same experiment,
                   inside the step's CUDA graph)
  ref_compile_cudagraphs  ref_compile with ``train.compile_mode=reduce-overhead`` (CUDA graphs per region)
  ref_compile_broadcast   ref_compile with the bias broadcast as in ref_broadcast_bias (baseline)
  paper_ckpt       swin_base student (ViT-B/16 teacher), activation checkpointing
  paper_nockpt     the same without checkpointing (may run out of memory: reported as oom)
  paper_graph      paper_nockpt with ``train.cuda_graph=true``
  paper_vitl_ckpt  swin_base + ViT-L/16 DINOv3 [15, 23], checkpointing, if time is left

    python bench/gpu_step.py --out $OUT/gpu.json           # H100: about 8 minutes (budget 560 s)
    python bench/gpu_step.py --smoke --out /tmp/smoke.json  # CPU, tiny sizes, same code, < 60 s
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the repo root too: the GPU machine runs this from a copy of the tree where deo is not installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import flop_counter, write_json  # noqa: E402

from deo.config import build_config, read_yaml  # noqa: E402
from deo.models import swin_window  # noqa: E402
from deo.models.layer_norm import InputDtypeLayerNorm  # noqa: E402
from deo.models.patch_embed import LinearPatchEmbed  # noqa: E402
from deo.train.compile_cache import CompileCache  # noqa: E402
from deo.train.config import PretrainConfig  # noqa: E402

from step_bench import REPO, TrainStep, summarise  # noqa: E402

H100_BF16_DENSE = 989e12
"""H100 SXM dense bf16 tensor-core peak, FLOP/s (no sparsity)."""

STATS = {
    "ms": {"mean": [1500.0] * 10, "std": [1000.0] * 10},
    "optical": {"mean": [110.0] * 3, "std": [50.0] * 3},
}
"""Band stats of the synthetic tiles (their values only scale the inputs)."""

VARIANTS: list[dict[str, Any]] = [
    {"name": "ref_eager", "config": "reference.yaml", "flops": True, "profile": True, "budget_s": 110},
    {"name": "ref_unfused", "config": "reference.yaml", "unfused_blocks": True, "baseline": True, "budget_s": 70},
    {"name": "ref_fp32_ln", "config": "reference.yaml", "unfused_blocks": True, "fp32_layer_norm": True,
     "baseline": True, "budget_s": 70},
    {"name": "ref_broadcast_bias", "config": "reference.yaml", "broadcast_bias": True, "baseline": True,
     "budget_s": 70},
    {"name": "ref_repeat_bias", "config": "reference.yaml", "repeat_bias": True, "baseline": True,
     "budget_s": 70},
    {"name": "ref_conv_embed", "config": "reference.yaml", "conv_embed": True, "baseline": True, "budget_s": 70},
    {"name": "ref_joint_trunk", "config": "reference.yaml", "joint_trunk": True, "experiment": True,
     "budget_s": 70},
    {"name": "ref_check_finite", "config": "reference.yaml", "with_check_finite": True, "baseline": True,
     "budget_s": 90},
    {"name": "ref_loader", "config": "reference.yaml", "loader": True, "budget_s": 110},
    {"name": "ref_compile", "config": "reference.yaml", "overrides": ["train.compile=true"], "budget_s": 170,
     "compile": True, "profile": True},
    {"name": "ref_compile_bundles", "config": "reference.yaml", "overrides": ["train.compile=true"],
     "budget_s": 150, "compile": True, "fresh_caches": True},
    {"name": "ref_compile_warm", "config": "reference.yaml", "overrides": ["train.compile=true"], "budget_s": 150,
     "compile": True},
    {"name": "ref_graph", "config": "reference.yaml", "overrides": ["train.cuda_graph=true"], "profile": True,
     "budget_s": 100},
    {"name": "ref_compile_graph", "config": "reference.yaml", "overrides": ["train.compile=true",
                                                                         "train.cuda_graph=true"],
     "budget_s": 170, "compile": True, "profile": True},
    {"name": "ref_compile_graph_overlap", "config": "reference.yaml",
     "overrides": ["train.compile=true", "train.cuda_graph=true", "train.overlap_teachers=true"],
     "experiment": True, "budget_s": 170, "compile": True},
    {"name": "ref_compile_augment", "config": "reference.yaml", "overrides": ["train.compile=true"],
     "compile_augment": True, "experiment": True, "budget_s": 170, "compile": True},
    {"name": "ref_compile_augment_graph", "config": "reference.yaml",
     "overrides": ["train.compile=true", "train.cuda_graph=true"], "compile_augment": True, "experiment": True,
     "budget_s": 170, "compile": True},
    {"name": "ref_compile_cudagraphs", "config": "reference.yaml",
     "overrides": ["train.compile=true", "train.compile_mode=reduce-overhead"], "budget_s": 170, "compile": True},
    {"name": "ref_compile_broadcast", "config": "reference.yaml", "overrides": ["train.compile=true"],
     "broadcast_bias": True, "baseline": True, "budget_s": 170, "compile": True},
    {"name": "paper_ckpt", "config": "paper.yaml",
     "overrides": ["teacher.name=vit_base_patch16_dinov3", "teacher.layers=[8,11]",
                   "train.activation_checkpointing=true"], "budget_s": 100},
    {"name": "paper_nockpt", "config": "paper.yaml",
     "overrides": ["teacher.name=vit_base_patch16_dinov3", "teacher.layers=[8,11]",
                   "train.activation_checkpointing=false"], "budget_s": 100},
    {"name": "paper_graph", "config": "paper.yaml",
     "overrides": ["teacher.name=vit_base_patch16_dinov3", "teacher.layers=[8,11]",
                   "train.activation_checkpointing=false", "train.cuda_graph=true"], "budget_s": 110},
    {"name": "paper_vitl_ckpt", "config": "paper.yaml", "overrides": ["train.activation_checkpointing=true"],
     "budget_s": 110},
]
"""What to measure, in order. ``budget_s`` caps each child's wall time (model build included)."""

def variant_config(v: dict[str, Any], smoke: bool, batch: int) -> PretrainConfig:
    """The config of variant ``v``: its YAML at batch ``batch`` on one worker, random DINOv3 weights.

    With ``smoke`` the tiny default student and teacher replace the real sizes (the step is the same code).
    """
    # eager unless the variant compiles (reference.yaml compiles)
    common = [f"train.batch_size={batch}", "scaling.num_workers=1", "teacher.weights=", "data=unused",
              "train.compile=false"]
    overrides = list(v.get("overrides", []))
    if smoke:
        yaml = read_yaml(REPO / "configs/pretrain/default.yaml")
        overrides = [o for o in overrides if o.startswith("train.")]
        return build_config(PretrainConfig, yaml, [*common, "train.precision=fp32", *overrides])
    yaml = read_yaml(REPO / "configs/pretrain" / v["config"])
    return build_config(PretrainConfig, yaml, [*common, "train.precision=bf16", *overrides])


def synthetic_batches(n: int, batch: int, tile: int, pin: bool, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` host batches as the shard loader yields them: uint16 MS, uint8 optical, pinned on CUDA hosts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {
            "ms": torch.randint(1, 6000, (batch, 10, tile, tile), generator=g, dtype=torch.int32).to(torch.uint16),
            "optical": torch.randint(0, 256, (batch, 3, tile, tile), generator=g, dtype=torch.int32).to(torch.uint8),
            "has_optical": torch.ones(batch, dtype=torch.bool),
            "ms_gsd": torch.full((batch,), 10.0),
        }
        out.append({k: v.pin_memory() for k, v in b.items()} if pin else b)
    return out


def shard_loader(batch: int, steps: int, tile: int, pin: bool, threads: int):  # noqa: ANN201
    """A ``ShardLoader`` over freshly written shards of random tiles, ``steps`` batches, no row read twice.

    Rows are written in 16-row groups as the ingest writes 256 px tiles, with random uint16 reflectance
    (incompressible: a pessimistic read size) and RGB.
    """
    import tempfile

    import numpy as np
    import pyarrow as pa

    from deo.data.loader import ShardIndex, ShardLoader
    from deo.data.sampling import lane_streams
    from deo.io.shards import rows_to_table, shard_schema, write_table

    folder = Path(tempfile.mkdtemp(prefix="deo-gpu-shards-"))
    schema = shard_schema(tile, tile)
    rng = np.random.default_rng(0)
    n, per_file = batch * steps, 256
    for start in range(0, n, per_file):
        rows = [{
            "sample_id": f"r{k}", "ms": rng.integers(1, 6000, (10, tile, tile), dtype=np.uint16),
            "optical": rng.integers(0, 256, (3, tile, tile), dtype=np.uint8), "ms_gsd": 10.0,
            "optical_gsd": 10.0, "crs": "EPSG:32629", "bounds": [0.0, 0.0, 1.0, 1.0], "lon": 0.0,
            "lat": 0.0, "time": None, "source_ms": "synthetic", "source_optical": "synthetic",
        } for k in range(start, min(n, start + per_file))]
        table = rows_to_table(rows, schema)
        # 16-row chunks become 16-row groups, as the ingest writes them
        chunked = pa.concat_tables([table.slice(g, 16) for g in range(0, table.num_rows, 16)])
        write_table(str(folder / f"part-{start:06d}.parquet"), chunked)
    files = sorted(str(p) for p in folder.glob("*.parquet"))
    index = ShardIndex.build(str(folder), files)
    lane = lane_streams(index.units, 0, 0, batch, 1, [], 4096)[0]
    return ShardLoader(index, lane, batch, steps, pin_memory=pin, decode_threads=threads)


class Partial:
    """A variant's result dict, rewritten to its file at every update (survives a kill)."""

    def __init__(self, path: str, **fields: Any) -> None:
        """Start the record with ``fields``."""
        self.path, self.data = path, dict(fields)
        self.write()

    def update(self, **fields: Any) -> None:
        """Merge ``fields`` and rewrite the file."""
        self.data.update(fields)
        self.write()

    def write(self) -> None:
        """Rewrite the file (atomically)."""
        write_json(self.path, self.data)


def read_public(path: str | None, smoke: bool, batch: int) -> dict[str, Any] | None:
    """The public code's step measured on this machine (bench/public_step.py), if it is comparable.

    Only a successful run at the same batch pairs, a smoke record only with a smoke run, and a full one
    only at the crops the ``ref_*`` variants train (reference.yaml's: 2 x 224 + 10 x 96).
    """
    if not path or not Path(path).is_file():
        return None
    rec = json.loads(Path(path).read_text())
    if rec.get("status") != "ok" or bool(rec.get("smoke")) != smoke or rec.get("batch") != batch:
        return None
    views = variant_config(VARIANTS[0], smoke=False, batch=batch).views  # ref_eager's
    if not smoke and (rec.get("global_px"), rec.get("local_px"), rec.get("local_crops")) != (
            views.global_size, views.local_size, views.n_local):
        return None
    return {k: rec.get(k) for k in ("device", "samples_per_s", "step_ms_median", "peak_mem_gib", "public_commit",
                                    "scaler_skipped_timed_steps", "process_group")}


def _gib(n: float) -> float:
    return round(n / 2**30, 3)


def host_bound_steps(step: Any, first: int, n: int, cuda: bool) -> dict[str, float]:
    """Is the step bound by the host? ``n`` steps, each from an idle GPU: median ms for the host to enqueue
    the step (``enqueue_ms``) and for the GPU to finish after that (``drain_ms``).

    A drain near zero means the GPU ran out of queued work before the host finished (host-bound: fewer
    kernels or CUDA graphs help, faster kernels do not); a long drain means the host ran ahead.
    """
    sync = torch.cuda.synchronize if cuda else (lambda: None)  # CPU (smoke): the drain is zero
    enqueue, drain = [], []
    for k in range(n):
        sync()
        t0 = time.perf_counter()
        step(first + k)
        t1 = time.perf_counter()
        sync()
        enqueue.append((t1 - t0) * 1e3)
        drain.append((time.perf_counter() - t1) * 1e3)
    return {"steps": n, "enqueue_ms": round(statistics.median(enqueue), 1),
            "drain_ms": round(statistics.median(drain), 1)}


def profile_steps(step: Any, first: int, n: int, cuda: bool, top: int = 45) -> dict[str, Any]:
    """``torch.profiler`` over ``n`` steps: the ops and kernels with most device time, and how busy the GPU was.

    ``gpu_busy_ms_per_step`` sums the kernels' own time (overlap aside): far below the wall time means
    the GPU waits for the host (launch-bound), close to it means the kernels themselves are the cost.
    ``attention_by_shape`` splits the attention and batched-matmul ops by input shapes: which SDPA
    backend each window size gets, and whether any falls back to the math path (``bmm``).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    w0 = time.perf_counter()
    with profile(activities=acts, record_shapes=True) as prof:
        for k in range(n):
            step(first + k)
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - w0) / n * 1e3  # profiled: includes the profiler's own overhead
    events = prof.key_averages()

    def dev_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0))

    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    busy = sum(dev_us(e) for e in kernels) / n / 1e3
    rank = sorted(events, key=dev_us if cuda else (lambda e: e.self_cpu_time_total), reverse=True)[:top]
    by_shape = [e for e in prof.key_averages(group_by_input_shape=True)
                if e.device_type != DeviceType.CUDA and ("attention" in e.key or e.key == "aten::bmm")]
    by_shape.sort(key=lambda e: getattr(e, "device_time_total", 0.0) if cuda else e.cpu_time_total, reverse=True)
    return {
        "steps": n,
        "wall_ms_per_step": round(wall, 1),
        "gpu_busy_ms_per_step": round(busy, 1),
        "kernels_per_step": round(sum(e.count for e in kernels) / n),
        "top_by_device_time": [
            {"name": e.key[:120], "kind": "kernel" if e.device_type == DeviceType.CUDA else "op",
             "calls_per_step": round(e.count / n, 1), "device_ms_per_step": round(dev_us(e) / n / 1e3, 2),
             "cpu_ms_per_step": round(e.self_cpu_time_total / n / 1e3, 2)}
            for e in rank
        ],
        "attention_by_shape": [
            {"name": e.key[:80], "shapes": str(e.input_shapes)[:200], "calls_per_step": round(e.count / n, 1),
             "device_ms_per_step": round((getattr(e, "device_time_total", 0.0) if cuda else e.cpu_time_total) / n / 1e3, 2)}
            for e in by_shape[:30]
        ],
    }


def run_variant(v: dict[str, Any], args: argparse.Namespace, path: str) -> None:
    """Build and time one variant in this process, writing its record to ``path``."""
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(args.threads)
    batch = args.batch
    cfg = variant_config(v, args.smoke, batch)
    rec = Partial(path, name=v["name"], status="building", device=torch.cuda.get_device_name() if cuda else "cpu",
                  student=cfg.model.student, teacher=cfg.teacher.name, teacher_layers=cfg.teacher.layers,
                  batch=batch, precision=cfg.train.precision, compile=cfg.train.compile,
                  activation_checkpointing=cfg.train.activation_checkpointing,
                  views=f"{cfg.views.n_global}x{cfg.views.global_size} + {cfg.views.n_local}x{cfg.views.local_size}",
                  tile_px=args.tile, tiles="pinned host, shipped non_blocking every step")
    try:
        if cfg.train.cuda_graph and not cuda:  # the smoke run: a CUDA graph needs CUDA
            rec.update(status="skipped: train.cuda_graph needs a CUDA device")
            return
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        bundles = CompileCache(args.out + ".compile_cache") if v.get("compile") else None
        if v.get("fresh_caches"):  # another machine: empty local caches, only the run's bundles
            import tempfile

            os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
            os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-")
            load_s = bundles.load()
            rec.update(bundles_loaded=len(bundles.loaded), bundle_load_s=round(load_s, 2),
                       caches="empty, then the bundles")
        elif v.get("compile"):  # this script's own local caches (main() empties them for the cold variant)
            local = Path(args.out + ".inductor")
            rec.update(caches="cold" if v["name"] == args.cold
                       else f"warm ({sum(1 for _ in local.rglob('*'))} cache files at start)")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(local)
            os.environ["TRITON_CACHE_DIR"] = str(local / "triton")
        runner = TrainStep(cfg, device, STATS)
        if v.get("unfused_blocks"):  # timm's roll / partition / reverse / roll and separate residual ops
            swin_window.AdaptiveWindowBlock.fused = False  # (class attribute: this child process only)
        if v.get("joint_trunk"):  # the experiment of bench/joint_trunk.py (this child only)
            from joint_trunk import joint_trunk_forward

            from deo.train.task import DEOTrainable

            DEOTrainable.forward = joint_trunk_forward
        if v.get("broadcast_bias"):  # the window attention before the fourth session (this child only)
            from window_attn_bench import broadcast_bias

            swin_window.window_attention = broadcast_bias
        if v.get("repeat_bias"):  # the window attention before the sixth session (this child only)
            from window_attn_bench import permuted_qkv_split, repeated_bias

            swin_window.window_attention = repeated_bias
            swin_window.split_qkv = permuted_qkv_split
        if v.get("conv_embed"):  # the patch embeddings before the eighth session: cuDNN's convolution
            LinearPatchEmbed.as_matmul = False  # (class attribute: this child process only)
        rec.update(window_attention=swin_window.window_attention.__name__,
                   qkv_split=swin_window.split_qkv.__name__,
                   patch_embed="matmul" if LinearPatchEmbed.as_matmul else "convolution")
        if v.get("compile_augment"):  # the experiment: the device half of the augmentation as one graph
            runner.augment.apply = torch.compile(runner.augment.apply, dynamic=False)
        if v.get("fp32_layer_norm"):  # back to autocast's float32 norms, for the side-by-side
            for m in runner.task.modules():
                if type(m) is InputDtypeLayerNorm:
                    m.__class__ = torch.nn.LayerNorm
        loader = None
        if v.get("loader"):
            steps_total = int(bool(v.get("flops"))) + args.warmup + args.steps
            w0 = time.perf_counter()
            loader = shard_loader(batch, steps_total, args.tile, pin=cuda, threads=args.loader_threads)
            rec.update(shards_written_s=round(time.perf_counter() - w0, 1), loader_threads=args.loader_threads)
            batches = iter(loader)

            def step(i: int) -> dict[str, torch.Tensor]:
                b = next(batches)
                ids = b.pop("sample_id")
                return runner(b, ids, i)
        else:
            host = synthetic_batches(2, batch, args.tile, pin=cuda)

            def step(i: int) -> dict[str, torch.Tensor]:
                ids = [f"s{i * batch + j}" for j in range(batch)]
                return runner(host[i % len(host)], ids, i)

        rec.update(status="warmup", build_s=round(time.perf_counter() - t0, 2),
                   trainable_params=runner.trainable_parameters())
        print(f"[{v['name']}] built in {rec.data['build_s']} s, {rec.data['trainable_params'] / 1e6:.1f}M "
              f"trainable", flush=True)
        i = 0
        if v.get("flops"):
            with flop_counter() as fc:
                step(i)
            i += 1
            rec.update(flops_per_step=fc.get_total_flops())
        elif not v.get("loader"):
            w0 = time.perf_counter()
            step(i)  # the same number of steps as ref_eager: losses_last compares across variants
            if cuda:
                torch.cuda.synchronize()
            rec.update(first_step_s=round(time.perf_counter() - w0, 2))  # compiled: the compile
            i += 1
        warm: list[float] = []
        limit = args.compile_warmup_s if v.get("compile") else args.warmup_s
        while len(warm) < args.warmup:
            w0 = time.perf_counter()
            step(i)
            if cuda:
                torch.cuda.synchronize()
            warm.append(round(time.perf_counter() - w0, 3))
            i += 1
            rec.update(warmup_step_s=warm)
            print(f"[{v['name']}] warm-up step {len(warm)}: {warm[-1]:.2f} s", flush=True)
            if bundles is not None and v["name"] == args.cold and (saved := bundles.save()):
                # what this run compiled, for ref_compile_bundles (kept even if the guard stops it next)
                rec.update(bundle_saved_mb=round(os.path.getsize(saved) / 2**20, 1))
            if sum(warm) > limit:
                rec.update(status=f"skipped: warm-up took {sum(warm):.0f} s > {limit:.0f} s")
                return
        if cuda:
            rec.update(peak_mem_warmup_gib=_gib(torch.cuda.max_memory_allocated()))
            torch.cuda.reset_peak_memory_stats()
        rec.update(status="timing")
        runner.clock.clear()
        finite = torch.ones((), dtype=torch.bool, device=device)
        last: dict[str, torch.Tensor] = {}
        wait0, wall0 = (loader.wait_seconds if loader else 0.0), time.perf_counter()
        for _ in range(args.steps):
            last = step(i)
            i += 1
            finite &= torch.stack([x.float().reshape(()) for x in last.values()]).isfinite().all()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - wall0
        res = summarise(runner.clock.steps(), batch)
        if loader is not None:
            res["data_wait"] = round((loader.wait_seconds - wait0) / wall, 4)
            res["samples_per_s_wall"] = round(args.steps * batch / wall, 1)
        res["loss_finite"] = bool(finite)
        res["losses_last"] = {k: round(float(x), 5) for k, x in last.items()}
        if cuda:
            res["peak_mem_gib"] = _gib(torch.cuda.max_memory_allocated())
            res["peak_reserved_gib"] = _gib(torch.cuda.max_memory_reserved())
        flops = rec.data.get("flops_per_step")
        if flops:
            achieved = flops / (res["step_ms_mean"] / 1e3)
            res["tflops_achieved"] = round(achieved / 1e12, 4)
            res["peak_tflops_assumed"] = args.peak_tflops
            res["mfu"] = round(achieved / (args.peak_tflops * 1e12), 4) if cuda else None
        if v.get("compile"):
            from torch._dynamo.utils import counters

            res["dynamo"] = {k: dict(counters[k]) for k in ("stats", "recompiles", "graph_break") if k in counters}
        rec.update(status="ok", **res)
        print(f"[{v['name']}] {res['samples_per_s']:.1f} samples/s, step {res['step_ms_median']:.1f} ms "
              f"(median), peak {res.get('peak_mem_gib', 'n/a')} GiB, finite={res['loss_finite']}", flush=True)
        if not loader:
            n_host = 5 if cuda else 1
            rec.update(host_bound=host_bound_steps(step, i, n_host, cuda))
            i += n_host
        if v.get("profile"):
            rec.update(profile=profile_steps(step, i, 2, cuda))
            i += 2
            print(f"[{v['name']}] profiled: GPU busy {rec.data['profile']['gpu_busy_ms_per_step']} ms of "
                  f"{rec.data['profile']['wall_ms_per_step']} ms per step", flush=True)
        if v.get("with_check_finite"):
            runner.task.check_finite_every_step = True
            runner.clock.clear()
            for _ in range(args.steps):
                step(i)
                i += 1
            nc = summarise(runner.clock.steps(), batch)
            rec.update(with_check_finite={k: nc[k] for k in ("samples_per_s", "step_ms_median",
                                                                 "step_ms_mean", "split_ms_median")})
            print(f"[{v['name']}] with a per-step finiteness sync: {nc['samples_per_s']:.1f} samples/s",
                  flush=True)
    except torch.cuda.OutOfMemoryError as e:
        rec.update(status="oom", error=str(e).splitlines()[0][:300],
                   peak_mem_gib=_gib(torch.cuda.max_memory_allocated()))
        print(f"[{v['name']}] out of memory", flush=True)
    except Exception as e:  # a broken variant must not stop the others: record it
        rec.update(status=f"error: {type(e).__name__}: {e}"[:500], traceback=traceback.format_exc()[-3000:])
        print(f"[{v['name']}] failed: {type(e).__name__}: {e}", flush=True)
    finally:
        rec.update(wall_s=round(time.perf_counter() - t0, 1))


def plan_variants(only: str, keep_caches: bool = False) -> tuple[list[dict[str, Any]], str | None]:
    """The variants to run, in order, and the one that compiles cold (None: none does).

    Args:
        only: ``--only``: comma-separated names, run in that order ("" runs all of :data:`VARIANTS`).
        keep_caches: ``--keep-caches``: every compiled variant reuses the caches already next to ``--out``.

    Raises:
        ValueError: an unknown name.
    """
    by_name = {v["name"]: v for v in VARIANTS}
    names = [n for n in only.split(",") if n] or list(by_name)
    if bad := sorted(set(names) - set(by_name)):
        raise ValueError(f"--only must name variants of {list(by_name)}, got {bad}")
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"--only names {twice} more than once")
    chosen = [by_name[n] for n in names]
    # the first compiled variant compiles from empty caches; later ones reuse them
    compiled = [v["name"] for v in chosen if v.get("compile") and not v.get("fresh_caches")]
    cold = None if keep_caches else next(iter(compiled), None)
    for v in chosen:
        if v.get("fresh_caches") and not keep_caches and (cold is None or names.index(cold) > names.index(v["name"])):
            raise ValueError(f"--only: {v['name']} loads the bundle a compiled variant before it saves; "
                             f"name one first (e.g. ref_compile,{v['name']})")
    return chosen, cold


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the variants in forked children within ``--budget-s`` and write the summary JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="summary JSON (rewritten after every variant)")
    ap.add_argument("--smoke", action="store_true", help="tiny student/teacher on CPU, few steps")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (20; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (4; smoke 1)")
    ap.add_argument("--batch", type=int, default=None, help="per-GPU batch (64; smoke 4)")
    ap.add_argument("--tile", type=int, default=None, help="tile side in pixels (256; smoke 64)")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the whole run (560; smoke 50)")
    ap.add_argument("--warmup-s", type=float, default=60, help="give up a variant whose warm-up exceeds this")
    ap.add_argument("--compile-warmup-s", type=float, default=None, help="same for compiled variants (120; smoke 8)")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE / 1e12, help="bf16 dense peak for MFU")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (smoke)")
    ap.add_argument("--loader-threads", type=int, default=4, help="ShardLoader decode threads (ref_loader)")
    ap.add_argument("--public-json", default=None,
                    help="bench/public_step.py's record from this machine: ratios against the public code "
                         "measured on the same GPU (issue 10's 159.6 samples/s is from an H100)")
    ap.add_argument("--keep-caches", action="store_true",
                    help="no cold variant: the first compiled variant too reuses the caches next to --out (from "
                         "an earlier call on the same machine)")
    args = ap.parse_args(argv)
    defaults = {"steps": (20, 2), "warmup": (4, 1), "batch": (64, 4), "tile": (256, 64), "budget_s": (560, 50),
                "compile_warmup_s": (120, 8)}
    for k, (full, smoke) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, smoke if args.smoke else full)
    chosen, args.cold = plan_variants(args.only, args.keep_caches)
    start = time.perf_counter()
    summary: dict[str, Any] = {
        "command": "python bench/gpu_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__, "smoke": args.smoke, "peak_tflops_assumed": args.peak_tflops,
        "reference_public_impl": {"s_per_step": 0.401, "samples_per_s": 159.6, "peak_gib": 38.9,
                                  "goal_samples_per_s": 320},
        "variants": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def flush() -> None:
        summary["wall_s"] = round(time.perf_counter() - start, 1)
        write_json(out, summary)

    if args.cold:  # the cold variant starts from empty local caches, and its bundle replaces any older one
        import shutil

        shutil.rmtree(args.out + ".inductor", ignore_errors=True)
        shutil.rmtree(args.out + ".compile_cache", ignore_errors=True)
    ctx = mp.get_context("fork")  # children inherit the imports; the parent never initialises CUDA
    for v in chosen:
        left = args.budget_s - (time.perf_counter() - start)
        # smoke: CPU inductor compiles for minutes, so the compiled variant exercises the time guard
        own = (args.compile_warmup_s + 6 if v.get("compile") else left) if args.smoke else v["budget_s"]
        if v.get("compile") and not args.smoke:
            own = max(own, args.compile_warmup_s + 50)  # a longer warm-up allowance gets the time to use it
        limit = min(own, left)
        if limit < (8 if args.smoke else 40):
            summary["variants"][v["name"]] = {"status": f"skipped: {left:.0f} s of the budget left"}
            flush()
            continue
        path = str(out) + f".{v['name']}.json"
        print(f"== {v['name']} (limit {limit:.0f} s)", flush=True)
        proc = ctx.Process(target=run_variant, args=(v, args, path))
        proc.start()
        proc.join(limit)
        timed_out = proc.is_alive()
        if timed_out:
            proc.kill()
            proc.join()
        try:
            rec = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError):
            rec = {"status": "no record"}
        if timed_out:
            rec["status"] = f"timeout after {limit:.0f} s (was: {rec.get('status')})"
        elif proc.exitcode:
            rec["status"] = f"child exit code {proc.exitcode} (was: {rec.get('status')})"
        summary["variants"][v["name"]] = rec
        flush()
        print(f"== {v['name']}: {rec.get('status')}", flush=True)
    ok = {n: r for n, r in summary["variants"].items() if r.get("status") == "ok"}
    if "ref_eager" in ok:
        # the shipped step only: ref_loader measures the data path, baselines the code it replaced
        step_only = {v["name"] for v in VARIANTS
                     if not v.get("loader") and not v.get("baseline") and not v.get("experiment")}
        best = max((r["samples_per_s"], n) for n, r in ok.items() if n.startswith("ref_") and n in step_only)
        summary["best_reference"] = {"variant": best[1], "samples_per_s": round(best[0], 1),
                                     "speedup_vs_public": round(best[0] / 159.6, 2)}
    public = read_public(args.public_json, args.smoke, args.batch)
    if public:  # the reference-config variants against the public code on this GPU, in this session
        summary["public_here"] = public
        summary["vs_public_here"] = {n: round(r["samples_per_s"] / public["samples_per_s"], 2)
                                     for n, r in ok.items() if n.startswith("ref_") and r.get("samples_per_s")}
        if "best_reference" in summary:
            summary["best_reference"]["speedup_vs_public_here"] = summary["vs_public_here"][best[1]]
    flush()
    print(json.dumps({n: {k: r.get(k) for k in ("status", "samples_per_s", "peak_mem_gib", "mfu")}
                      for n, r in summary["variants"].items()}, indent=1), flush=True)
    return summary


if __name__ == "__main__":
    main()
