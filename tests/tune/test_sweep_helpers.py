"""Sweep helpers without a Ray cluster: loguniform domains, trial ids of errored trials, error lines,
the results a sweep writes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from deo.config import build_config, read_yaml
from deo.tune.config import SweepConfig
from deo.tune.space import to_tune_space
from deo.tune.sweep import _error_line, _trial_id, write_results

from conftest import REPO


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


def _result(trial: str, alpha1: float, knn: list[float], steps: list[int]) -> SimpleNamespace:
    return SimpleNamespace(
        metrics={"trial_id": trial, "step": steps[-1]}, config={"loss.alpha1": alpha1, "loss.alpha2": 0.5, "loss.alpha3": 0.5,
                                                       "loss.gamma": 1.0}, error=None, path="",
        metrics_dataframe=pd.DataFrame({"step": steps, "probe/knn_avg": knn}))


def test_the_best_trial_does_not_depend_on_tunes_order_and_its_config_has_its_own_run_name(tmp_path):
    """A rerun of a finished sweep used to rewrite best.yaml with another of several tied trials; and
    best.yaml kept the base config's run.name, so `--config best.yaml` found runs/default instead."""
    sweep = build_config(SweepConfig, read_yaml(REPO / "configs/sweep/alpha_gamma.yaml"),
                         [f"storage={tmp_path}", f"pretrain_config={REPO / 'configs/pretrain/default.yaml'}"])
    trials = [_result("b_00002", 0.2, [0.3, 0.5, 0.5], [20, 40, 60]),
              _result("b_00000", 0.4, [0.5], [20]),  # as good, but stopped early by ASHA
              _result("b_00001", 0.6, [0.4, 0.5, 0.4], [20, 40, 60]),
              _result("b_00003", 0.8, [0.2, 0.3, 0.45], [20, 40, 60])]
    for order in ([0, 1, 2, 3], [2, 3, 1, 0], [3, 0, 2, 1]):
        result = write_results(sweep, [trials[i] for i in order], str(tmp_path / "s"))
        assert result.best["trial"] == "b_00001"  # longest-trained of the tied, then the first id
        assert [r["trial"] for r in result.rows] == ["b_00000", "b_00001", "b_00002", "b_00003"]
        best = (tmp_path / "s" / "best.yaml").read_text()
        assert best.startswith("# best trial b_00001: probe/knn_avg=0.5\n")
        cfg = read_yaml(tmp_path / "s" / "best.yaml")
        assert cfg["run"]["name"] == "alpha_gamma-best" and cfg["loss"]["alpha1"] == 0.6
    assert {r["trial"]: r["status"] for r in result.rows}["b_00000"] == "STOPPED"
