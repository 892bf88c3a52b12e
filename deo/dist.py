"""Every collective of deo in one place, each with a single-process fallback.

With no initialised ``torch.distributed`` process group, rank is 0, world size 1 and every collective is
the identity, so models and losses run unchanged in a plain script, a test or on one GPU.
Every rank must reach every collective: never call these inside ``if is_main_process()``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks WITH gradients: d(sum)/dx_r is the incoming gradient summed over ranks.

    ``torch.distributed.nn.functional.all_reduce`` implements the backward as another all-reduce of the
    output gradient, which is the correct gradient of a replicated global quantity (each rank computes
    the same loss from the same summed tensor, and DDP averages the parameter gradients).
    """
    if get_world_size() == 1:  # also spares one worker's process group (Ray makes one) a collective
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, op=dist.ReduceOp.SUM)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from all ranks along dim 0 -> (world*B, ...), keeping gradients.

    Assumes the same B on every rank.
    """
    if get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, no gradient (for metrics)."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / get_world_size()


@torch.no_grad()
def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Copy rank ``src``'s tensor to every rank, in place."""
    if is_distributed():
        dist.broadcast(x, src)
    return x


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (an FSDP-sharded parameter), else ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def all_gather_object(obj: object) -> list[object]:
    """Gather a picklable object from every rank (list indexed by rank)."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
