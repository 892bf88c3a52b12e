"""Helpers of tests/eval (not a conftest, so ``from conftest import ...`` elsewhere is unaffected): a run folder with a real (randomly initialised) tiny student and teacher, as training writes it."""

from __future__ import annotations

import io

import pytest
import torch

from deo.bands import DEO_BANDS
from deo.config import to_dict
from deo.io import storage
from deo.models.student import build_student
from deo.train.config import PretrainConfig

STATS = {
    "ms": {"mean": [1300.0, 1200.0, 1100.0, 1400.0, 1900.0, 2200.0, 2100.0, 2400.0, 1800.0, 1200.0],
           "std": [300.0, 400.0, 500.0, 500.0, 600.0, 700.0, 700.0, 800.0, 900.0, 800.0]},
    "optical": {"mean": [100.0, 95.0, 90.0], "std": [50.0, 45.0, 40.0]},
}


def write_run(run: str, step: int = 7, teacher: bool = True) -> dict:
    """Write ``<run>/checkpoint_<step>/state.pt`` and return the state."""
    cfg = PretrainConfig()
    torch.manual_seed(step)
    student = build_student(cfg.model, img_size=cfg.views.global_size)
    state = {"student": student.state_dict(), "config": to_dict(cfg), "step": step, "stats": STATS,
             "bands": DEO_BANDS}
    if teacher:
        import warnings

        from deo.models.dinov3 import build_teacher

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state["optical_teacher"] = build_teacher(cfg.teacher).state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(storage.join(run, f"checkpoint_{step:08d}", "state.pt"), buf.getvalue())
    return state


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> tuple[str, dict]:
    """(run folder, its checkpoint state); import this fixture into a test module to use it."""
    run = str(tmp_path_factory.mktemp("runs") / "default")
    return run, write_run(run)
