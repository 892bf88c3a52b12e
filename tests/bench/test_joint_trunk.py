"""bench/joint_trunk.py: one trunk pass per view size computes what the task's four passes compute."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from joint_trunk import joint_trunk_forward  # noqa: E402

from deo.config import build_config, read_yaml  # noqa: E402
from deo.train.config import PretrainConfig  # noqa: E402
from deo.train.task import DEOTrainable  # noqa: E402

from tests_helpers import REPO  # noqa: E402


def test_joint_trunk_equals_the_task_forward_without_stochastic_depth():
    cfg = build_config(PretrainConfig, read_yaml(REPO / "configs/pretrain/default.yaml"),
                       ["model.drop_path=0", "teacher.weights="])
    torch.manual_seed(0)
    trainable = DEOTrainable(cfg, teacher_dim=64).train()
    v = cfg.views
    b = 3
    views = {
        "ms_global": torch.randn(v.n_global, b, 10, v.global_size, v.global_size),
        "ms_local": torch.randn(v.n_local, b, 10, v.local_size, v.local_size),
        "opt_global": torch.randn(v.n_global, b, 3, v.optical_global_size, v.optical_global_size),
        "opt_local": torch.randn(v.n_local, b, 3, v.local_size, v.local_size),
    }
    grid = (v.optical_global_size // 16, v.optical_global_size // 16)
    want = trainable(views, grid)
    got = joint_trunk_forward(trainable, views, grid)
    assert got.keys() == want.keys() == {"s_ms", "s_cls", "s_pF", "s_pmid"}
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="optical local views"):
        joint_trunk_forward(trainable, {k: x for k, x in views.items() if k != "opt_local"}, grid)
