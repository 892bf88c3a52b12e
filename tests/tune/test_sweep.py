"""Ray Tune sweeps over real tiny pretraining runs: ASHA, results, failures, resume."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from deo.config import build_config, read_yaml
from deo.train.config import PretrainConfig
from deo.tune.config import SweepConfig

from tests_helpers import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def sweep_yaml(tmp_path, shards, storage, name, space, extra=None, eurosat=None):
    overrides = [f"data={shards}", "train.max_steps=24", "train.batch_size=8", "views.n_local=2",
                 "probe.every=8", "run.checkpoint_every=8", "run.report_every=8", "run.log_every=4",
                 "run.export=false", "run.tensorboard=false", f"probe.dataset={eurosat}",
                 "probe.max_samples=120"]
    doc = {"storage": storage, "name": name, "pretrain_config": str(REPO / "configs/pretrain/default.yaml"),
           "overrides": overrides, "space": space, "num_samples": 4, "max_concurrent": 2,
           "grace_period": 8, "reduction_factor": 2,
           "resources": {"num_workers": 1, "cpus_per_worker": 0.5, "trainable_cpus": 0.01, "max_failures": 1},
           **(extra or {})}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_sweep_cli(path, *args, timeout=900, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "pipelines/sweep.py"), "--config", str(path), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


def read_rows(fs_or_path):
    return list(csv.DictReader(fs_or_path.splitlines()))


def test_asha_sweep_on_s3_stops_trials_early_and_writes_results(sample_shards, shared_data, s3_server,
                                                               s3_bucket, tmp_path):
    import s3fs

    data = s3_server.upload_dir(sample_shards, f"{s3_bucket}/shards")
    # Which trial ASHA stops must not hang on noise: ranked by the loss, whose -gamma x coding rate
    # (a coding rate of 1.5-2.5) puts gamma=4 far ahead of the others, and run one after another, the
    # second trial (gamma=0.25) always meets the first at the rung and is stopped there. (Ranked by the
    # kNN probe, close trials in grid order sometimes each beat the ones before: nothing stopped.)
    space = {"loss.gamma": {"type": "grid", "values": [4.0, 0.25, 0.5, 1.0]},
             "loss.alpha1": {"type": "choice", "values": [0.5, 1.0]}}
    path = sweep_yaml(tmp_path, data, f"{s3_bucket}/sweeps", "asha", space,
                      {"num_samples": 1, "max_concurrent": 1, "metric": "loss", "mode": "min"},
                      eurosat=shared_data / "eurosat_ms")
    r = run_sweep_cli(path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "=== sweep results ===" in r.stdout
    # a fresh client: fsspec's shared instance carries directory listings cached by earlier tests
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint}, skip_instance_cache=True)
    fs.invalidate_cache()
    root = f"{s3_bucket.removeprefix('s3://')}/sweeps/asha"
    rows = read_rows(fs.cat(f"{root}/results.csv").decode())
    assert len(rows) == 4
    assert {r["status"] for r in rows} <= {"TERMINATED", "STOPPED"}
    assert any(r["status"] == "STOPPED" for r in rows), rows  # ASHA stopped at least one early
    assert any(r["status"] == "TERMINATED" and int(r["steps"]) == 24 for r in rows)
    best = yaml.safe_load(fs.cat(f"{root}/best.yaml").decode())
    cfg = build_config(PretrainConfig, best)  # a valid pretrain config ...
    top = min(rows, key=lambda r: float(r["loss"]))
    assert cfg.loss.gamma == float(top["loss.gamma"]) == 4.0  # ... with the best weights
    assert cfg.loss.alpha1 == pytest.approx(float(top["loss.alpha1"]))
    stopped = next(r for r in rows if float(r["loss.gamma"]) == 0.25)
    assert stopped["status"] == "STOPPED" and int(stopped["steps"]) == 8, rows
    assert fs.cat(f"{root}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    for row in rows:  # stopped trials keep their checkpoints
        folder = f"{root}/trials/{row['trial']}"
        # on failure, say what the sweep did write (seen once, 2026-11-27: one trial had no run folder)
        listing = fs.ls(folder, refresh=True) if fs.exists(folder) else sorted(fs.find(root))[:60]
        assert fs.glob(f"{folder}/checkpoint_0*"), (row, listing, r.stdout[-3000:])


def test_a_failing_trial_is_recorded_and_the_others_finish(sample_shards, shared_data, tmp_path):
    space = {"loss.eps": {"type": "grid", "values": [0.05, -1.0]}}  # eps=-1 is rejected in the trial
    # a relative storage, as the shipped sweep configs have: the trials run in Ray's working
    # directories, so their run folders must still land under the driver's storage
    path = sweep_yaml(tmp_path, sample_shards, "sweeps", "fails", space,
                      {"num_samples": 1, "scheduler": "fifo"}, eurosat=shared_data / "eurosat_ms")
    r = run_sweep_cli(path, "overrides=[train.max_steps=8,probe.every=8,run.checkpoint_every=8,"
                            f"data={sample_shards},probe.dataset={shared_data / 'eurosat_ms'},"
                            "train.batch_size=8,views.n_local=2,run.export=false]", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = read_rows((tmp_path / "sweeps/fails/results.csv").read_text())
    by_eps = {float(x["loss.eps"]): x for x in rows}
    assert by_eps[-1.0]["status"] == "ERROR" and "loss.eps" in by_eps[-1.0]["error"]
    assert by_eps[0.05]["status"] == "TERMINATED" and int(by_eps[0.05]["steps"]) == 8
    trial_runs = list((tmp_path / "sweeps/fails/trials").glob("*/summary.json"))
    assert len(trial_runs) == 1 and (trial_runs[0].parent / "checkpoint_00000008").is_dir(), trial_runs
    assert "1 trial(s) failed" in r.stdout


def test_an_interrupted_sweep_resumes_without_repeating_finished_trials(sample_shards, shared_data, tmp_path):
    """Ctrl-C (SIGINT) ends the sweep as interrupted: exit 130, no best.yaml, cut trials marked; a
    rerun resumes, and a rerun after the driver and its Ray are killed outright resumes too."""
    space = {"loss.gamma": {"type": "grid", "values": [0.5, 1.0, 2.0]}}
    path = sweep_yaml(tmp_path, sample_shards, str(tmp_path / "sweeps"), "resume", space,
                      {"num_samples": 1, "scheduler": "fifo", "max_concurrent": 1},
                      eurosat=shared_data / "eurosat_ms")
    trials = tmp_path / "sweeps/resume/trials"

    def start_and_wait_for_finished(n):
        proc = subprocess.Popen([sys.executable, "pipelines/sweep.py", "--config", str(path)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        deadline = time.time() + 400
        finished = []
        while time.time() < deadline and len(finished) < n:  # wait until n trials have finished
            finished = [p for p in trials.glob("*") if (p / "summary.json").exists()] if trials.exists() else []
            time.sleep(1)
        assert len(finished) >= n, f"{n} trial(s) did not finish before the deadline"
        return proc, finished

    proc, finished = start_and_wait_for_finished(1)
    os.kill(proc.pid, signal.SIGINT)  # Ctrl-C to the driver
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-4000:]
    assert "sweep interrupted:" in out and "rerun the same command to resume" in out, out[-4000:]
    assert "Tuner.restore(" not in out  # Ray's Python advice, not how this command resumes
    assert "sweep interrupted: 1 of 3 trials done" in out or "sweep interrupted: 2 of 3 trials done" in out, out
    rows = read_rows((tmp_path / "sweeps/resume/results.csv").read_text())
    assert "TERMINATED" in {x["status"] for x in rows} and {x["status"] for x in rows} <= {"TERMINATED", "UNFINISHED"}
    assert not (tmp_path / "sweeps/resume/best.yaml").exists()
    first, first_mtime = finished[0], (finished[0] / "summary.json").stat().st_mtime

    proc, finished = start_and_wait_for_finished(2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray die mid-sweep
    proc.communicate()
    done = {p: (p / "summary.json").stat().st_mtime for p in finished}
    r = run_sweep_cli(path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "resuming sweep" in r.stdout
    rows = read_rows((tmp_path / "sweeps/resume/results.csv").read_text())
    assert len(rows) == 3 and all(x["status"] == "TERMINATED" for x in rows), rows
    assert (first / "summary.json").stat().st_mtime == first_mtime  # finished ones are not run again
    assert all((p / "summary.json").stat().st_mtime == t for p, t in done.items())
    assert (tmp_path / "sweeps/resume/best.yaml").exists()


def test_sweep_config_rejects_unknown_space_keys(tmp_path):
    from deo.config import ConfigError
    from deo.tune.space import to_tune_space

    with pytest.raises(ConfigError, match="space.loss.gama: not a pretraining config key; did you mean 'loss.gamma'"):
        to_tune_space({"loss.gama": {"type": "uniform", "low": 0, "high": 1}})
    with pytest.raises(ConfigError, match="needs field 'high'"):
        to_tune_space({"loss.gamma": {"type": "uniform", "low": 0}})
    cfg = build_config(SweepConfig, read_yaml(REPO / "configs/sweep/alpha_gamma.yaml"))
    assert set(cfg.space) == {"loss.alpha1", "loss.alpha2", "loss.alpha3", "loss.gamma"}
    # a dotted override splits a space key at its dots: say so, and how to give the space instead
    with pytest.raises(ConfigError, match=r"space.loss: .* splits one at its dots: edit the sweep YAML, or give "
                                          r"the whole space, e.g. space=\{loss.alpha1: "):
        build_config(SweepConfig, read_yaml(REPO / "configs/sweep/alpha_gamma.yaml"), ["space.loss.alpha1.type=unifrom"])
    whole = build_config(SweepConfig, read_yaml(REPO / "configs/sweep/alpha_gamma.yaml"),
                         ["space={loss.alpha1: {type: uniform, low: 0.25, high: 1.0}}"])
    assert whole.space == {"loss.alpha1": {"type": "uniform", "low": 0.25, "high": 1.0}}


def test_trials_share_one_compile_cache_unless_the_config_names_one(tmp_path):
    from deo.config import to_dict
    from deo.tune.sweep import trial_config

    sweep = SweepConfig(storage=str(tmp_path / "sweeps"), name="s")
    base = to_dict(build_config(PretrainConfig, read_yaml(REPO / "configs/pretrain/default.yaml"), []))
    a, b = (trial_config(sweep, base, {}, t) for t in ("t1", "t2"))
    assert a.train.compile_cache == b.train.compile_cache == str(tmp_path / "sweeps" / "s" / "compile_cache")
    assert a.run.name != b.run.name
    base["train"]["compile_cache"] = "s3://bucket/compiled"
    assert trial_config(sweep, base, {}, "t3").train.compile_cache == "s3://bucket/compiled"


def test_config_errors_fail_before_ray_starts():
    for args, message in ((["overrides=[train.max_stepz=3]"], "did you mean 'train.max_steps'"),
                          (["space={loss.gama: {type: choice, values: [1]}}"], "space.loss.gama")):
        r = run_sweep_cli(REPO / "configs/sweep/alpha_gamma.yaml", *args, timeout=120)
        assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
        assert "Started a local Ray instance" not in r.stdout + r.stderr
