"""Per-iteration schedules."""

import numpy as np
import pytest

from deo.config import build_config
from deo.train.config import PretrainConfig
from deo.train.schedules import Schedules, cosine_schedule


def test_warmup_then_cosine_hits_both_ends():
    s = cosine_schedule(1.0, 0.1, 110, warmup_steps=10)
    assert len(s) == 110
    assert s[0] == 0.0 and s[5] == pytest.approx(0.5)
    assert s[10] == pytest.approx(1.0) and s[-1] == pytest.approx(0.1)
    assert np.all(np.diff(s[10:]) <= 1e-12)  # monotone decay after warmup


def test_schedules_follow_config_and_resume_at_step():
    cfg = build_config(PretrainConfig, overrides=["train.max_steps=50", "train.lr=0.01", "train.warmup_steps=0"])
    s = Schedules.from_config(cfg.train)
    lr, wd, m = s.at(0)
    assert lr == pytest.approx(0.01) and wd == pytest.approx(cfg.train.weight_decay)
    assert m == pytest.approx(cfg.train.ema_momentum)
    assert s.at(49)[2] == pytest.approx(cfg.train.ema_momentum_end)
    again = Schedules.from_config(cfg.train)  # rebuilt on resume: identical values
    assert again.at(17) == s.at(17)


def test_lr_reference_batch_scales_the_peak_linearly():
    """train.lr_reference_batch=256 reads train.lr as the public DEO code does: the rate for 256 samples."""
    base = ["train.max_steps=50", "train.lr=5e-4", "train.warmup_steps=0", "train.batch_size=1024"]
    scaled = build_config(PretrainConfig, overrides=[*base, "train.lr_reference_batch=256"])
    assert Schedules.from_config(scaled.train).at(0)[0] == pytest.approx(2e-3)
    assert Schedules.from_config(build_config(PretrainConfig, overrides=base).train).at(0)[0] == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="lr_reference_batch must be >= 0"):
        build_config(PretrainConfig, overrides=[*base, "train.lr_reference_batch=-1"])


def test_only_the_lr_warms_up():
    cfg = build_config(PretrainConfig, overrides=["train.max_steps=50", "train.warmup_steps=10"])
    s = Schedules.from_config(cfg.train)
    assert s.lr[0] == 0.0
    assert s.momentum[0] == pytest.approx(cfg.train.ema_momentum)
    assert s.weight_decay[0] == pytest.approx(cfg.train.weight_decay)
