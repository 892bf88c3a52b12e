"""Data parallelism of the training task: DDP or FSDP (``scaling.strategy``), and full state dicts.

``ddp`` replicates the trainable module on every rank and all-reduces gradients. ``fsdp`` (PyTorch's
FSDP2, ``fully_shard``) shards every parameter, its gradient and its AdamW moments over the ranks along
dim 0 and all-gathers each unit's parameters just before it runs: the memory mode for students whose
weights and optimizer state, not only activations, strain one GPU. Units are the patch embeddings, each
Swin stage, the final norm and each head. The EMA teacher is sharded into the same units, so its local
shards line up with the student's and the EMA update stays a local foreach lerp with no communication.

Checkpoints always hold FULL state dicts (keyed by parameter name, optimizer state included), gathered
here: a run saved with one strategy or world size resumes with any other. In one process (no
``torch.distributed`` group) both strategies are the identity.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from deo import dist
from deo.train.config import STRATEGIES

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place: the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` (or any submodule) was sharded with ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def student_units(student: nn.Module) -> list[nn.Module]:
    """FSDP units of a :class:`deo.models.student.DEOStudent`: embeddings, Swin stages, final norm."""
    return [*student.embeds.values(), *student.swin.layers, student.swin.norm]


def _shard(units: list[nn.Module], root: nn.Module, what: str) -> None:
    """``fully_shard`` each unit with parameters, then ``root`` (which takes the parameters left over)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    for unit in units:
        if any(True for _ in unit.parameters()):
            fully_shard(unit)
    fully_shard(root)
    # a parameter outside every unit would stay whole and never be gathered: catch it now, not at step 1
    left = [n for n, p in root.named_parameters() if not isinstance(p, DTensor)]
    if left:
        raise RuntimeError(f"FSDP left {what} parameters unsharded: {left[:5]}")


def distribute(task: Any, strategy: str, device: torch.device) -> None:
    """Make ``task`` data-parallel over the initialised process group (no-op in one process).

    ``ddp`` wraps ``task.trainable`` in DistributedDataParallel. ``fsdp`` shards ``task.trainable``
    (units: :func:`student_units` + each head, then the root) and ``task.ema``'s MS branch into the
    same units. Build the optimizer AFTER this call: sharding replaces the parameters.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"scaling.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not dist.is_distributed() or dist.get_world_size() == 1:
        return  # one worker (Ray makes a group even then): nothing to replicate or shard
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        idle = getattr(task.trainable, "idle_embeddings", [])  # e.g. no optical term: optical embed unused
        task.trainable = nn.parallel.DistributedDataParallel(
            task.trainable, device_ids=ids, find_unused_parameters=bool(idle)
        )
        return
    # deo never modifies a module's output in place (FSDP's losses equal DDP's: test_parallel.py)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    trainable = task.trainable
    heads = [m for name, m in trainable.named_children() if name != "student"]
    _shard([*student_units(trainable.student), *heads], trainable, "trainable")
    ema = task.ema.module  # MSBranch(student, head_ms), called through the EMATeacher root
    _shard([*student_units(ema.student), ema.head_ms], task.ema, "EMA teacher")


@contextlib.contextmanager
def no_grad_sync(module: nn.Module, skip: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter inside (``skip``): accumulation micro-steps."""
    if not skip:
        yield
        return
    if isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
        return
    if is_sharded(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
        return
    yield


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole ``module``'s state dict on CPU, keyed as the unwrapped module's.

    A collective under FSDP (each shard is all-gathered): every rank must call it; rank 0 gets the
    tensors, the other ranks an empty dict (also without FSDP: only rank 0 saves).
    """
    from torch.distributed.tensor import DTensor

    out = {}
    for name, value in unwrap(module).state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if dist.is_main_process():
            out[name] = value.detach().cpu()
    return out


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (as :func:`full_state_dict` returns; every rank passes it) into a plain,
    DDP-wrapped or sharded module."""
    module = unwrap(module)
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True))


class WholeStudent:
    """The student with whole weights for rank-0 work (in-loop probe, export).

    Without FSDP it is the training student itself. Sharded, each call gathers the weights (a
    collective: call it on every rank) into a plain copy kept on rank 0 (None on the others).
    """

    def __init__(self, build: Callable[[], nn.Module]) -> None:
        """``build`` makes an unsharded student of the same architecture (on the training device)."""
        self._build = build
        self._copy: nn.Module | None = None

    def __call__(self, task: Any) -> nn.Module | None:
        student = unwrap(task.trainable).student
        if not is_sharded(student):
            return student
        state = full_state_dict(student)
        if not dist.is_main_process():
            return None
        if self._copy is None:
            with torch.random.fork_rng(devices=[]):  # building draws init weights: keep rank 0's stream
                self._copy = self._build()
        self._copy.load_state_dict(state)
        return self._copy


def _keyed_by_name(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
                   ) -> dict[str, Any]:
    names = {id(p): n for n, p in module.named_parameters()}
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint optimizer has {len(state['param_groups'])} parameter groups, "
                         f"this run {len(optimizer.param_groups)}")
    rename: dict[int, str] = {}
    for saved, live in zip(state["param_groups"], optimizer.param_groups, strict=True):
        if len(saved["params"]) != len(live["params"]):
            raise ValueError("checkpoint optimizer groups hold a different number of parameters than "
                             "this run's model: was it written by another model config?")
        rename.update((i, names[id(p)]) for i, p in zip(saved["params"], live["params"], strict=True))
    return {
        "state": {rename[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [rename[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter NAME with full tensors (collective under FSDP)."""
    return get_optimizer_state_dict(unwrap(module), optimizer, options=_FULL)


def load_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load :func:`full_optimizer_state`'s output (any strategy or world size wrote it).

    Checkpoints written before deo keyed optimizer state by name hold integer ids; they are renamed
    through the optimizer's parameter groups, which :func:`deo.train.loop.build_optimizer` always
    builds in the same order.
    """
    if any(isinstance(k, int) for g in state.get("param_groups", []) for k in g["params"]):
        state = _keyed_by_name(unwrap(module), optimizer, state)
    # strict=False: a parameter the objective never uses (an idle embedding) has no AdamW state
    set_optimizer_state_dict(
        unwrap(module), optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False)
    )
