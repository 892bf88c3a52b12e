"""The public DEO implementation's own training step, timed on this machine: issue 10's baseline, side by side.

Issue 10's reference (0.401 s/step = 159.6 samples/s, peak 38.9 GiB) was measured on an H100 elsewhere.
A number measured on another GPU (the device machines lent lately are H200s, whose faster memory speeds
up this memory-bound step) can only be compared with the public code measured on that same GPU, in the
same session. This script runs the public code's own ``train_one_epoch`` (wolfilip/DEO-FM, MIT licence)
with its README settings: Swin-T student and EMA teacher (torchvision), DINOv3 ViT-B/16 distiller
(layers 8 and 11), 2 x 224^2 + 10 x 96^2 crops of 10 bands, batch 64, fp16 autocast with a grad scaler,
its per-parameter clipping, Python-loop EMA and per-step host syncs; ``--compile false`` because issue 10
saw its whole-student compile not finish a first step in 5 minutes. Epoch 1, so the heads' last layers
are not frozen as in epoch 0. The record counts the steps its grad scaler skipped (an fp16 overflow skips
AdamW, which would make a timed step short).

The public code is neither vendored nor downloaded: ``--public-repo`` names a local checkout, e.g.
``git clone https://github.com/wolfilip/DEO-FM .public/DEO-FM`` (this script was checked at its commit
55c7ae1; ``.public/`` is git-ignored and travels to the device machine through ``run``'s ``carry``).
What this script replaces, because it is outside the timed step or absent on the machine:
- the data: its DataLoader (CPU workers cropping fMoW HDF5, ``pin_memory=True``) -> float32 crops made
  once in pinned host memory and handed over as that loader does, so each step still copies the 493 MB
  batch to the GPU inside the loop;
- DINOv3: ``torch.hub.load`` of Meta's repository and weights -> timm's ``vit_base_patch16_dinov3``,
  randomly initialised, behind DINOv3's ``get_intermediate_layers`` (same FLOPs; deo's GPU bench also
  uses a random DINOv3);
- ``torchrun``: one process group of one rank (NCCL as its ``init_distributed_mode`` makes it, with a
  60 s timeout; gloo on the CPU). Should NCCL fail there, the student runs without DDP, whose one-rank
  all-reduce is a copy: the record says so (``process_group``), and the public step is then a little
  faster. (A hang would not fail but abort the process: the record then stays at ``building``.);
- wandb: its README command logs every step to wandb; ``--nowandb`` (a ``store_false`` flag: it turns the
  logging off) because the machine is offline. This too can only make the public step faster;
- kornia, h5py, wandb (and PIL): imported by its modules, unused by the step; empty stand-ins when absent.

Usage (the device machine): ``python bench/public_step.py --public-repo .public/DEO-FM --out /tmp/g/public.json``.
``--smoke`` runs the same code on the CPU at batch 2 with 2 local crops of 32 px (the global crops stay
224 px; tests/bench/test_public_step.py); on a machine without CUDA ``.cuda()`` and
``torch.cuda.synchronize`` are no-ops. ``--count-flops`` counts the FLOPs of the first (warm-up) step
with ``FlopCounterMode``, as ``gpu_step.py`` does for deo's step: on the CPU, ``--batch 8 --steps 1``
compares the two steps' work at the issue's crops without a GPU.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import datetime
import importlib
import os
import statistics
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import flop_counter, free_port, write_json  # noqa: E402  (bench/ is not a package)

# The README's training command, for one GPU; --compile false: see the module docstring.
PUBLIC_ARGS = ["--arch", "swin_t", "--batch_size_per_gpu", "64", "--local_crops_number", "10", "--eps", "0.05",
               "--ms_arch", "--dist_arch", "dinov3", "--dist_arch_size", "base", "--compile", "false", "--nowandb"]
GLOBAL_PX, LOCAL_PX, BANDS = 224, 96, 10
# smoke: the global crops stay 224 px (its patch loss resizes the student's grid to DINOv3's 14 x 14)
SMOKE = {"batch": 2, "local_crops": 2, "global_px": 224, "local_px": 32}
SMOKE_ARGS = ["--batch_size_per_gpu", str(SMOKE["batch"]), "--local_crops_number", str(SMOKE["local_crops"])]
OPTIONAL_MODULES = ("kornia", "kornia.augmentation", "h5py", "wandb", "PIL", "PIL.Image")


class DINOv3Intermediates(nn.Module):
    """timm's DINOv3 behind the call the public ``DINOvX`` makes on Meta's model.

    ``get_intermediate_layers(x=x, n=layers, return_class_token=True)``: one (patch tokens (B, N, D),
    [cls] (B, D)) pair per block in ``layers``, after the final norm, registers dropped.
    """

    def __init__(self, name: str = "vit_base_patch16_dinov3") -> None:
        super().__init__()
        self.vit = timm.create_model(name, pretrained=False, num_classes=0)

    def get_intermediate_layers(self, x: torch.Tensor, n: tuple[int, ...], return_class_token: bool = True,
                                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = self.vit.forward_intermediates(x, indices=list(n), return_prefix_tokens=True, norm=True,
                                             output_fmt="NLC", intermediates_only=True)
        return [(patches, prefix[:, 0]) for patches, prefix in out]


def import_public(repo: Path) -> tuple[types.ModuleType, list[str]]:
    """Import the public ``main_dino`` from ``repo``/DEO; stand-ins for the optional modules it lacks here."""
    code = repo / "DEO"
    if not (code / "main_dino.py").is_file():
        raise FileNotFoundError(f"--public-repo {repo}: expected a checkout of wolfilip/DEO-FM with "
                                f"DEO/main_dino.py (git clone https://github.com/wolfilip/DEO-FM {repo})")
    stubbed = []
    for name in OPTIONAL_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # absent, or broken on this machine: the step never calls it
            sys.modules[name] = types.ModuleType(name)
            stubbed.append(name)
    sys.path.insert(0, str(code))
    return importlib.import_module("main_dino"), stubbed


class PinnedBatches:
    """What the public DataLoader yields: (12 float32 crops of (B, 10, s, s), unused MS image), pinned.

    ``n_batches`` distinct batches are made once and cycled for ``steps`` iterations. ``times`` gets the
    clock at each hand-over: the loop syncs with the host every step, so consecutive differences are
    whole steps, the host-to-device copy included. With a ``scaler``, ``scales`` gets its scale at each
    hand-over (it halves after a step it skipped).
    """

    def __init__(self, steps: int, batch: int, local_crops: int, global_px: int, local_px: int,
                 pin: bool, n_batches: int = 2, count_flops: bool = False, scaler: Any = None) -> None:
        g = torch.Generator().manual_seed(0)
        sizes = [global_px] * 2 + [local_px] * local_crops
        self.batches = []
        for _ in range(n_batches):
            crops = [torch.randn(batch, BANDS, s, s, generator=g) for s in sizes]
            self.batches.append(([c.pin_memory() for c in crops] if pin else crops, None))
        self.steps = steps
        self.times: list[float] = []
        self.count_flops = count_flops
        self.flops: int | None = None
        self.scaler = scaler
        self.scales: list[float] = []

    def __len__(self) -> int:
        return self.steps

    def _handover(self) -> None:
        self.times.append(time.perf_counter())
        if self.scaler is not None:  # after the loop's own sync: no extra wait
            self.scales.append(self.scaler.get_scale())

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], None]]:
        for i in range(self.steps):
            self._handover()
            if i == 0 and self.count_flops:  # the whole first step runs between this yield and the next
                with flop_counter() as counter:
                    yield self.batches[0]
                self.flops = counter.get_total_flops()
                continue
            yield self.batches[i % len(self.batches)]
        self._handover()

    def skipped_steps(self, first: int) -> int:
        """Steps from ``first`` on that the grad scaler skipped (its scale went down after them)."""
        s = self.scales
        return sum(1 for i in range(first, len(s) - 1) if s[i + 1] < s[i])


@contextlib.contextmanager
def cpu_stand_ins() -> Iterator[None]:
    """Without CUDA (the smoke, a CPU FLOP count): the public loop's ``.cuda()`` calls and syncs are no-ops.

    Its metric logger's end-of-epoch all-reduce makes CUDA tensors whenever a process group exists, so
    the smoke's gloo group is hidden from it.
    """
    misc = sys.modules["utils.misc"]
    saved = (torch.Tensor.cuda, nn.Module.cuda, torch.cuda.synchronize, misc.is_dist_avail_and_initialized)
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.cuda.synchronize = lambda *a, **k: None
    misc.is_dist_avail_and_initialized = lambda: False
    try:
        yield
    finally:
        (torch.Tensor.cuda, nn.Module.cuda, torch.cuda.synchronize,  # type: ignore[method-assign]
         misc.is_dist_avail_and_initialized) = saved


class WithoutDDP(nn.Module):
    """DDP's stand-in when no process group could be made: the ``.module`` the public loop reads."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def init_one_rank(args: argparse.Namespace, cuda: bool) -> str:
    """One process group of one rank as the public ``init_distributed_mode`` makes it; what was made."""
    args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, True
    if not cuda:
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
        return "gloo"
    torch.cuda.set_device(args.gpu)
    try:
        torch.distributed.init_process_group("nccl", init_method="env://", rank=0, world_size=1,
                                             timeout=datetime.timedelta(seconds=60))
        torch.distributed.barrier()
        return "nccl"
    except Exception as e:  # any failure: time the step without DDP, and say so
        if torch.distributed.is_initialized():
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group()
        return f"none: NCCL failed ({type(e).__name__}: {e})"


def build(main_dino: types.ModuleType, args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    """Student, EMA teacher, distiller, losses and optimizer as the public ``train_dino`` builds them.

    Its own classes and helpers; only the data, DINOv3's source and the process launch differ (module
    docstring). Returns the keyword arguments of its ``train_one_epoch`` (less the loader, schedules,
    epoch and args), and ``trainable_params``, the student's trainable parameter count.
    """
    tv = main_dino.torchvision_models
    student, teacher = tv.__dict__[args.arch](), tv.__dict__[args.arch]()
    embed_dim = student.norm.normalized_shape[0]
    del student.features[0], teacher.features[0]  # its patch embeddings live in the wrapper
    late = main_dino.get_swin_stage_embed_dim(student, main_dino.SWIN_STAGE_LATE)
    mid = main_dino.get_swin_stage_embed_dim(student, main_dino.SWIN_STAGE_MID)
    bottleneck = main_dino.get_distill_bottleneck_dim(args.dist_arch_size)

    def head(in_dim: int, out_dim: int) -> nn.Module:
        return main_dino.DINOHead(in_dim=in_dim, use_bn=args.use_bn_in_head, hidden_dim=args.hidden_dim,
                                  bottleneck_dim=out_dim)

    wrap = main_dino.MultiCropWrapper
    student = wrap(backbone=student, head_ms=head(embed_dim, args.z_dim), cls_head=head(late, bottleneck),
                   patch_head_late=head(late, bottleneck), patch_head_mid=head(mid, bottleneck),
                   to_distill="student")
    teacher = wrap(backbone=teacher, head_ms=head(embed_dim, args.z_dim), to_distill="teacher")
    dinov = main_dino.DINOvX.__new__(main_dino.DINOvX)  # its __init__ only calls torch.hub.load
    nn.Module.__init__(dinov)
    dinov.dist_arch, dinov.dist_arch_size = args.dist_arch, args.dist_arch_size
    dinov.feat_extr = DINOv3Intermediates().eval()
    distiller = wrap(backbone=dinov, to_distill="distiller")
    student, teacher, distiller = student.cuda(), teacher.cuda(), distiller.cuda()
    if torch.distributed.is_initialized():
        student = nn.parallel.DistributedDataParallel(student, device_ids=[args.gpu] if cuda else None)
    else:
        student = WithoutDDP(student)
    teacher.load_state_dict(student.module.state_dict(), strict=False)
    for p in [*teacher.parameters(), *distiller.parameters()]:
        p.requires_grad = False
    n_crops = args.local_crops_number + 2
    return dict(
        student=student, teacher=teacher, teacher_without_ddp=teacher,
        dino_loss=main_dino.MCRLoss(n_crops, args.reduce_cov, args.expa_type, args.eps, args.coeff).cuda(),
        optimizer=torch.optim.AdamW(main_dino.get_params_groups(student), fused=True),
        fp16_scaler=torch.amp.GradScaler("cuda") if args.use_fp16 and cuda else None,
        distiller=distiller, distiller_loss_cos=main_dino.DistLoss(n_crops, args.dist_arch).cuda(),
        trainable_params=sum(p.numel() for p in student.parameters() if p.requires_grad),
    )


def run(rec: dict[str, Any], public_repo: Path, steps: int, warmup: int, smoke: bool, batch: int | None = None,
        count_flops: bool = False) -> None:
    """Build the public model and time ``warmup + steps`` iterations of its ``train_one_epoch`` into ``rec``."""
    cuda = torch.cuda.is_available() and not smoke
    main_dino, stubbed = import_public(public_repo)
    argv = PUBLIC_ARGS + (SMOKE_ARGS if smoke else []) + (["--batch_size_per_gpu", str(batch)] if batch else [])
    args = main_dino.get_args_parser().parse_args(argv)
    args.epochs = 2
    rec.update(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
               public_args=argv, stand_ins=stubbed)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        rec["public_commit"] = subprocess.check_output(["git", "-C", str(public_repo), "rev-parse", "HEAD"],
                                                       text=True, stderr=subprocess.DEVNULL).strip()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")  # one rank: NCCL needs no other interface
    rec["process_group"] = init_one_rank(args, cuda)  # as torchrun --nproc_per_node 1
    main_dino.fix_random_seeds(args.seed)
    torch.backends.cudnn.benchmark = True
    stand_ins = contextlib.nullcontext() if cuda else cpu_stand_ins()
    builtin_print = builtins.print
    # its loop exits on a non-finite loss after print(..., force=True), which needs its own print installed
    sys.modules["utils.misc"].setup_for_distributed(True)
    try:
        with stand_ins:
            parts = build(main_dino, args, cuda)
            rec["trainable_params_m"] = round(parts.pop("trainable_params") / 1e6, 1)
            sizes = dict(batch=args.batch_size_per_gpu, local_crops=args.local_crops_number,
                         global_px=SMOKE["global_px"] if smoke else GLOBAL_PX,
                         local_px=SMOKE["local_px"] if smoke else LOCAL_PX)
            rec.update(sizes)
            loader = PinnedBatches(warmup + steps, pin=cuda, count_flops=count_flops,
                                   scaler=parts["fp16_scaler"], **sizes)
            schedule = main_dino.cosine_scheduler
            lr = schedule(args.lr * args.batch_size_per_gpu / main_dino.REFERENCE_BATCH_SIZE, args.min_lr,
                          args.epochs, len(loader), warmup_epochs=min(args.warmup_epochs, args.epochs - 1))
            wd = schedule(args.weight_decay, args.weight_decay_end, args.epochs, len(loader))
            momentum = schedule(args.momentum_teacher, 1, args.epochs, len(loader))
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                main_dino.train_one_epoch(data_loader=loader, lr_schedule=lr, wd_schedule=wd,
                                          momentum_schedule=momentum, epoch=1, args=args, **parts)
                rec["status"] = "ok"
            except SystemExit:  # its loop exits when a loss is not finite
                rec["status"] = "loss not finite (the public loop exited)"
    finally:
        builtins.print = builtin_print
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    step_s = [b - a for a, b in zip(loader.times, loader.times[1:], strict=False)][warmup:]
    if step_s:
        median = statistics.median(step_s)
        rec.update(steps=len(step_s), warmup=warmup, step_ms_median=round(1e3 * median, 1),
                   step_ms_mean=round(1e3 * statistics.fmean(step_s), 1),
                   samples_per_s=round(args.batch_size_per_gpu / median, 2))
    if cuda:
        rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if loader.flops is not None:
        rec["flops_per_step"] = loader.flops
    if loader.scales:
        timed = loader.skipped_steps(warmup)
        rec.update(scaler_skipped_timed_steps=timed, scaler_skipped_warmup_steps=loader.skipped_steps(0) - timed,
                   scaler_scale_last=loader.scales[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--public-repo", type=Path, default=Path(".public/DEO-FM"),
                    help="local checkout of https://github.com/wolfilip/DEO-FM")
    ap.add_argument("--out", required=True, help="record JSON")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (15; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (5; smoke 1)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny batch and crops")
    ap.add_argument("--batch", type=int, default=None, help="per-GPU batch (the README's 64; smoke 2)")
    ap.add_argument("--count-flops", action="store_true", help="FLOPs of the first step (FlopCounterMode)")
    args = ap.parse_args(argv)
    steps = args.steps if args.steps is not None else (2 if args.smoke else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    if args.count_flops and warmup < 1:
        ap.error("--count-flops counts the first step, which must be a warm-up step (--warmup >= 1)")
    start = time.perf_counter()
    rec: dict[str, Any] = {
        "name": "public_eager", "status": "building", "smoke": args.smoke,
        "command": "python bench/public_step.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_json(args.out, rec)
    try:
        run(rec, args.public_repo, steps, warmup, args.smoke, args.batch, args.count_flops)
    except Exception as e:  # the record says what failed; the caller (gpu_session.sh) goes on
        rec["status"] = f"error: {type(e).__name__}: {e}"
        traceback.print_exc()
    rec["wall_s"] = round(time.perf_counter() - start, 1)
    write_json(args.out, rec)
    print({k: rec.get(k) for k in ("status", "device", "samples_per_s", "step_ms_median", "peak_mem_gib")},
          flush=True)
    return rec


if __name__ == "__main__":
    main()
