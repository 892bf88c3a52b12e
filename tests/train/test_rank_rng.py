"""restore_rng when the world size changed: reseeded from (seed, rank, step), never a saved stream reused;
checkpoints of earlier versions; the scratch folders checkpoints pass through."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import torch

from deo import dist
from deo.train import checkpoint as ckpt


def _state_after_seed(s: int) -> torch.Tensor:
    torch.manual_seed(s)
    return torch.get_rng_state()


def test_fewer_workers_than_saved_reseed_from_seed_rank_and_step(monkeypatch):
    states = []
    for rank in (0, 1):
        torch.manual_seed(ckpt.rank_seed(0, rank))
        states.append(ckpt.rng_state())
    saved = {"rng_per_rank": states}
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)  # 1 worker resuming a 2-worker run
    ckpt.restore_rng(saved, seed=0, step=7)
    at7 = torch.get_rng_state()
    assert torch.equal(at7, _state_after_seed(ckpt.rank_seed(0, 0, 7)))
    assert not torch.equal(at7, states[0]["torch"])
    ckpt.restore_rng(saved, seed=0, step=14)  # a later resume draws another stream
    assert not torch.equal(torch.get_rng_state(), at7)


def test_numpy_and_python_states_come_from_rank_0_and_old_checkpoints_still_resume(monkeypatch):
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    np.random.seed(5)
    saved_np = ckpt.rng_state()
    np.random.seed(6)
    ckpt.restore_rng({"rng_per_rank": [saved_np, ckpt.rng_state()]}, seed=0, step=3)
    np.random.seed(5)
    expected = np.random.rand()
    ckpt.restore_rng({"rng_per_rank": [saved_np, saved_np]}, seed=0, step=3)
    assert np.random.rand() == expected
    ckpt.restore_rng({"rng": saved_np}, seed=0, step=3)  # written before rng_per_rank existed
    assert np.random.rand() == expected


def test_scratch_folders_of_exited_processes_are_removed_by_the_next_save(tmp_path, monkeypatch):
    """A SIGKILLed worker never runs its cleanup; the folder it was writing (a whole checkpoint) would stay
    in /tmp for good."""
    monkeypatch.setattr(ckpt.tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    orphan = tmp_path / f"deo-ckpt-{dead}-abc"
    recent_orphan = tmp_path / f"deo-ckpt-{dead}-new"
    live = tmp_path / f"deo-ckpt-{os.getppid()}-xyz"  # a running process's (pytest's parent)
    other = tmp_path / "deo-ckpt-k2j3h4"  # no pid: made before the pid was in the name, or by someone else
    huge = tmp_path / "deo-ckpt-99999999999999999999-x"  # os.kill would raise OverflowError on it
    for folder in (orphan, recent_orphan, live, other, huge):
        folder.mkdir()
        (folder / "state.pt").write_bytes(b"x")
    old = time.time() - ckpt.ORPHAN_AGE_S - 60
    for folder in (orphan, live, other, huge):
        os.utime(folder / "state.pt", (old, old))
        os.utime(folder, (old, old))
    with ckpt.scratch_folder() as tmp:
        assert os.path.isdir(tmp) and os.path.basename(tmp).startswith(f"deo-ckpt-{os.getpid()}-")
        assert os.path.dirname(tmp) == str(tmp_path)
    assert not os.path.exists(tmp)
    assert not orphan.exists()
    assert recent_orphan.exists() and live.exists() and other.exists() and huge.exists()
