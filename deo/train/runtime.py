"""Where the training loop runs: the seam between the plain loop and its launcher.

The loop (:mod:`deo.train.loop`) needs a rank, a device, and a way to save/restore checkpoints and
report metrics; data parallelism over the process group the launcher set up is
:mod:`deo.train.parallel`'s. :class:`LocalRuntime` does this in one process (the benchmark baseline
and the GPU machine, which has no Ray); the Ray Train runtime lives in :mod:`deo.train.ray_glue`.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import torch

from deo import dist
from deo.io import storage
from deo.train import checkpoint as ckpt


class Runtime(Protocol):
    """What the training loop needs from its launcher."""

    rank: int
    world_size: int
    device: torch.device

    def restore(self) -> dict[str, Any] | None:
        """The latest checkpoint's state, or None for a fresh run."""
        ...

    def save(self, state: dict[str, Any] | None, metrics: dict[str, Any], step: int) -> None:
        """Persist a checkpoint (``state`` from rank 0, None elsewhere) with its metrics."""
        ...

    def report(self, metrics: dict[str, Any]) -> None:
        """Report metrics to the launcher (no checkpoint)."""
        ...


def default_device() -> torch.device:
    """The local CUDA device of this process, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


class LocalRuntime:
    """One process (or an already initialised torch.distributed group), checkpoints in the run folder."""

    def __init__(self, run_uri: str, keep: int = 2, device: torch.device | None = None) -> None:
        self.run_uri = run_uri
        self.keep = keep
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device or default_device()

    def restore(self) -> dict[str, Any] | None:
        return ckpt.newest_readable_state(self.run_uri)

    def save(self, state: dict[str, Any] | None, metrics: dict[str, Any], step: int) -> None:
        if state is not None:
            with ckpt.scratch_folder() as tmp:
                path = ckpt.save_state(state, tmp)
                with open(path, "rb") as f:
                    storage.write_bytes(
                        storage.join(self.run_uri, ckpt.checkpoint_name(step), ckpt.STATE_FILE), f.read()
                    )
            self._prune()
        dist.barrier()

    def _prune(self) -> None:
        fs, path = storage.filesystem(self.run_uri)
        # checkpoint_<step> folders only: a run Ray Train started also holds checkpoint_manager_snapshot.json
        names = sorted(
            name for e in fs.ls(path, detail=False)
            if ckpt.CHECKPOINT_NAME.match(name := e.rstrip("/").rsplit("/", 1)[-1])
        )
        for name in names[: -self.keep]:
            storage.remove(storage.join(self.run_uri, name), recursive=True)

    def report(self, metrics: dict[str, Any]) -> None:
        return None
