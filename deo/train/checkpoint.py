"""What a checkpoint holds, and how it is written to / read from a ``checkpoint_*`` folder.

A checkpoint folder holds one file, ``state.pt`` (``torch.save`` of plain tensors, numbers and dicts, so
``torch.load(weights_only=True)`` reads it back):

| key | content |
|---|---|
| ``student`` | state dict of the student backbone (patch embeds + shared stages) |
| ``trainable`` | state dict of student + every head (what DDP wraps) |
| ``ema`` | state dict of the EMA teacher (student + head_ms) |
| ``optical_teacher`` | state dict of the frozen teacher, only when it was randomly initialised |
| ``optimizer``, ``scaler`` | optimizer and grad-scaler states |
| ``step`` | optimizer steps done |
| ``data_position`` | :class:`deo.data.sampling.DataPosition` as a dict |
| ``rng_per_rank`` | torch (CPU and the rank's CUDA device) / numpy / python RNG states of every rank (older checkpoints also hold rank 0's as ``rng``; both are read) |
| ``config`` | the resolved config (dict) |
| ``stats`` | the shard manifest's normalisation stats |
| ``bands`` | band names per modality |
| ``gsd`` / ``gsd_range`` | metres per pixel of the training tiles (:func:`deo.io.shards.manifest_gsd`) |
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from deo import dist
from deo.io import storage

STATE_FILE = "state.pt"
CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)$")
"""Name of a checkpoint folder; the group is the step."""


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint taken after ``step`` optimizer steps (sorts by step)."""
    return f"checkpoint_{step:08d}"


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The torch seed of one worker after model init: each rank draws its own stochastic-depth masks."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def rng_state() -> dict[str, Any]:
    """RNG states to restore for an exact resume (this process's; the CUDA one of its current device)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # on a GPU, dropout and stochastic-depth masks come from the CUDA generator
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": [np_state[0], torch.from_numpy(np.asarray(np_state[1])), *np_state[2:]],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))


def all_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, indexed by rank (a collective: every rank calls it)."""
    # as bytes: all_gather_object cannot unpickle tensor storages (torch 2.14)
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    return [torch.load(io.BytesIO(b), weights_only=True) for b in dist.all_gather_object(buf.getvalue())]


def restore_rng(state: dict[str, Any], seed: int, step: int) -> None:
    """Restore this rank's RNG states from a checkpoint ``state``.

    Each rank gets its own saved states back when the world size is the one that saved them; otherwise
    (or from checkpoints that kept rank 0's only) rank 0's states, reseeded per rank from (seed, rank,
    step): a resume then continues on distinct streams, not the exact ones.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = state.get("rng_per_rank") or [state["rng"]]
    if len(per_rank) == world:
        set_rng_state(per_rank[rank])
        return
    set_rng_state(per_rank[0])
    torch.manual_seed(rank_seed(seed, rank, step))


SCRATCH_PREFIX = "deo-ckpt-"
ORPHAN_AGE_S = 900.0
"""A scratch folder is left alone this long after its last write even when its process is gone: a
process in another PID namespace sharing this /tmp may be the one writing it."""


@contextlib.contextmanager
def scratch_folder() -> Iterator[str]:
    """A local temporary folder for one checkpoint on its way to storage, removed afterwards.

    Its name carries the process id (``deo-ckpt-<pid>-...``), so the folders that a killed process never
    removed (a SIGKILLed or OOM-killed worker; a checkpoint can be GBs) are removed by the next save on
    this machine: :func:`remove_orphaned_scratch`.
    """
    try:
        remove_orphaned_scratch()
    except Exception as e:  # tidying up after others must never fail this save
        print(f"warning: could not remove orphaned checkpoint scratch folders: {e}", flush=True)
    tmp = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_orphaned_scratch(root: str | None = None, min_age_s: float = ORPHAN_AGE_S) -> list[str]:
    """Remove the :func:`scratch_folder` folders under ``root`` (the temp dir) whose process has exited
    and which nothing has written to for ``min_age_s``; returns their paths."""
    root = root or tempfile.gettempdir()
    removed = []
    pattern = re.compile(rf"{re.escape(SCRATCH_PREFIX)}(\d{{1,9}})-")  # a pid, not any number
    try:
        with os.scandir(root) as it:
            entries = list(it)
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False) or _process_alive(int(match.group(1))):
            continue
        try:
            with os.scandir(entry.path) as it:
                newest = max([entry.stat().st_mtime] + [f.stat().st_mtime for f in it])
        except OSError:  # removed meanwhile, or not ours to read
            continue
        if now - newest >= min_age_s:
            shutil.rmtree(entry.path, ignore_errors=True)
            if not os.path.exists(entry.path):
                removed.append(entry.path)
    return removed


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs; anything unclear counts as alive (its folder is left alone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # another user's (EPERM), or not a pid here
        return True
    return True


def save_state(state: dict[str, Any], folder: str) -> str:
    """Write ``state`` into ``folder`` (local path) and return the file path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, STATE_FILE)
    torch.save(state, path)
    return path


class UnreadableCheckpoint(ValueError):
    """A checkpoint's state file exists but does not load (cut short by a lost worker, or damaged)."""


def load_state(folder_or_file: str) -> dict[str, Any]:
    """Read a checkpoint's state from a ``checkpoint_*`` folder (local or URI) or ``state.pt``.

    Raises:
        FileNotFoundError: no state file there.
        UnreadableCheckpoint: the file does not load, naming it.
    """
    uri = folder_or_file if folder_or_file.endswith(".pt") else storage.join(folder_or_file, STATE_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"no checkpoint state at {uri}")
    data = storage.read_bytes(uri)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - damaged bytes make the unpickler raise almost anything
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UnreadableCheckpoint(f"checkpoint {uri} is unreadable ({len(data)} bytes; "
                                   f"{type(e).__name__}: {first})") from e


def list_checkpoints(run_uri: str) -> list[str]:
    """``checkpoint_<step>`` folders holding a state file under a run folder, newest first."""
    fs, path = storage.filesystem(run_uri)
    if not fs.exists(path):
        return []
    found: list[tuple[int, str]] = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        m = CHECKPOINT_NAME.match(name)
        if m and fs.exists(entry.rstrip("/") + "/" + STATE_FILE):
            found.append((int(m.group(1)), storage.join(run_uri, name)))
    return [uri for _, uri in sorted(found, reverse=True)]


def latest_checkpoint(run_uri: str) -> str | None:
    """The ``checkpoint_*`` folder with the highest step under a run folder, or None."""
    found = list_checkpoints(run_uri)
    return found[0] if found else None


def newest_readable(run_uri: str, log: Callable[[str], None] = print) -> tuple[str, dict[str, Any]] | None:
    """(folder, state) of the newest checkpoint that loads, or None without any; each unreadable one
    (cut short by a lost worker, or damaged) is skipped, saying so through ``log``.

    Raises:
        UnreadableCheckpoint: the run has checkpoints but none loads (starting over would overwrite the
            run's config and metrics).
    """
    errors = []
    for uri in list_checkpoints(run_uri):
        try:
            return uri, load_state(uri)
        except UnreadableCheckpoint as e:
            log(f"skipping: {e}")
            errors.append(str(e))
    if errors:
        raise UnreadableCheckpoint(f"no checkpoint of {run_uri} loads: " + "; ".join(errors))
    return None


def newest_readable_state(run_uri: str) -> dict[str, Any] | None:
    """The state of :func:`newest_readable` to resume from, or None.

    Raises:
        UnreadableCheckpoint: as :func:`newest_readable`, saying that the run cannot resume.
    """
    try:
        found = newest_readable(run_uri, log=lambda m: print(m, flush=True))
    except UnreadableCheckpoint as e:
        raise UnreadableCheckpoint(f"{e}; so the run cannot resume (move them away to start it over)") from None
    return found[1] if found else None
