"""restore_rng when the world size changed: reseeded from (seed, rank, step), never a saved stream reused."""

from __future__ import annotations

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
    saved = {"rng": states[0], "rng_per_rank": states}
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)  # 1 worker resuming a 2-worker run
    ckpt.restore_rng(saved, seed=0, step=7)
    at7 = torch.get_rng_state()
    assert torch.equal(at7, _state_after_seed(ckpt.rank_seed(0, 0, 7)))
    assert not torch.equal(at7, states[0]["torch"])
    ckpt.restore_rng(saved, seed=0, step=14)  # a later resume draws another stream
    assert not torch.equal(torch.get_rng_state(), at7)
