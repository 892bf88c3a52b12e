"""Backbone.forward: the pooled feature is the mean over every final token, (B, C, H, W) -> (B, D)."""

from __future__ import annotations

import io

import torch

import deo
from deo.bands import DEO_BANDS
from deo.config import to_dict
from deo.export import export_checkpoint
from deo.io import storage
from deo.models.student import build_student
from deo.train.config import PretrainConfig

STATS = {
    "ms": {"mean": [float(1000 + 100 * i) for i in range(10)], "std": [float(500 + 10 * i) for i in range(10)]},
    "optical": {"mean": [90.0, 100.0, 80.0], "std": [40.0, 35.0, 30.0]},
}


def test_pooled_feature_averages_all_final_tokens(tmp_path):
    cfg = PretrainConfig()
    torch.manual_seed(0)
    student = build_student(cfg.model, img_size=cfg.views.global_size)
    buf = io.BytesIO()
    torch.save({"student": student.state_dict(), "config": to_dict(cfg), "step": 1, "stats": STATS,
                "bands": DEO_BANDS}, buf)
    run = str(tmp_path / "run")
    storage.write_bytes(storage.join(run, "checkpoint_00000001", "state.pt"), buf.getvalue())
    out, _ = export_checkpoint(run)
    net = deo.load_backbone(out)
    torch.manual_seed(1)
    x = net.normalise(torch.rand(2, 10, 64, 64) * 3000, "ms")
    with torch.no_grad():
        tokens = net.forward_features(x, "ms")  # (2, 2, 2, D)
        pooled = net(x, "ms")
    assert pooled.shape == (2, net.num_features)
    torch.testing.assert_close(pooled, tokens.reshape(2, -1, net.num_features).mean(dim=1))
