"""Sweep helpers without a Ray cluster: loguniform domains, trial ids of errored trials, error lines."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from deo.tune.space import to_tune_space
from deo.tune.sweep import _error_line, _trial_id


def test_loguniform_spec_samples_on_a_log_scale():
    space = to_tune_space({"loss.gamma": {"type": "loguniform", "low": 0.01, "high": 100.0},
                           "loss.alpha1": {"type": "uniform", "low": 0.01, "high": 100.0}})
    log = np.asarray(space["loss.gamma"].sample(size=2000, random_state=0))
    lin = np.asarray(space["loss.alpha1"].sample(size=2000, random_state=0))
    assert log.min() >= 0.01 and log.max() <= 100.0
    assert 0.3 < np.median(log) < 3.0  # log-uniform: median at the geometric mean, 1
    assert 30 < np.median(lin) < 70


def test_trial_id_of_a_trial_that_errored_before_reporting():
    res = SimpleNamespace(metrics={}, path="/s/fails/_trial_8d1c2_00001_1_loss.eps=-1.0_2026-01-01_00-00-00/")
    assert _trial_id(res) == "8d1c2_00001"
    assert _trial_id(SimpleNamespace(metrics={"trial_id": "abc_00002"}, path="")) == "abc_00002"


def test_error_line_is_the_last_informative_line():
    err = RuntimeError("ray.exceptions.RayTaskError(ConfigError): wrapper\n  traceback line\n\n"
                       "deo.config.ConfigError: loss.eps must be > 0, got -1.0\n")
    assert _error_line(err) == "deo.config.ConfigError: loss.eps must be > 0, got -1.0"
    assert _error_line(None) == ""


def test_randint_excludes_its_high_end_as_documented():
    space = to_tune_space({"views.n_local": {"type": "randint", "low": 4, "high": 6}})
    assert set(space["views.n_local"].sample(size=200, random_state=0)) == {4, 5}
