"""deo.cluster without a cluster: what is refused up front, and the `ray job submit` scratch warning."""

from __future__ import annotations

import pytest
import ray

from deo import cluster as ray_cluster
from deo.cluster import check_resources, warn_if_job_scratch
from deo.config import ConfigError, build_config, to_dict
from deo.train.config import PretrainConfig
from deo.tune.config import SweepConfig


@pytest.fixture
def cluster(monkeypatch):
    """Stand-ins for a connected cluster's resources and whether it autoscales."""
    state = {"have": {"CPU": 2.0, "memory": 1e9, "node:127.0.0.1": 1.0, "deo_ingest": 2.0}, "autoscaler": False}
    state["nodes"] = [state["have"]]
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(state["have"]))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": dict(n)} for n in state["nodes"]])
    monkeypatch.setattr(ray_cluster, "autoscaler_present", lambda wait_s=0.0: state["autoscaler"])
    return state


def test_a_request_the_cluster_can_never_grant_names_its_key(cluster):
    check_resources({"CPU": 2.0, "deo_ingest": 1.0}, {})  # fits
    with pytest.raises(ConfigError, match=r"^ray_resources.deo_gpu needs 1 deo_gpu but the Ray cluster has 0 and "
                                          r"no autoscaler .*\{'deo_ingest': 2.0\}.*--resources '\{\"deo_gpu\": N\}'.*"
                                          r"or drop it$"):
        check_resources({"deo_gpu": 1.0}, {"deo_gpu": "ray_resources.deo_gpu"}, fix="drop it")
    with pytest.raises(ConfigError, match=r"^scaling.x needs 4 CPU but the Ray cluster has 2 and"):
        check_resources({"CPU": 4.0}, {"CPU": "scaling.x"})
    cluster["have"]["CPU"] = 5.0
    check_resources({"CPU": 6 * 0.8 + 0.2}, {})  # 5.000000000000001 in floats: Ray counts 1e-4 units
    cluster["nodes"] = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 3.0}]  # enough in total, but not on one node
    cluster["have"]["GPU"] = 1.0
    check_resources({"CPU": 4.0}, {}, per_unit={"CPU": 2.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match=r"one worker asks for 3 CPU, 1 GPU \(k.cpu, k.gpu\) but no node .* "
                                          r"has that much \(the most any node has: CPU 3, GPU 1\)"):
        check_resources({"CPU": 3.0}, {"CPU": "k.cpu", "GPU": "k.gpu"}, per_unit={"CPU": 3.0, "GPU": 1.0})
    cluster["autoscaler"] = True  # it may add nodes that have it: Ray waits for them
    check_resources({"deo_gpu": 1.0, "CPU": 64.0}, {}, per_unit={"CPU": 64.0})


def test_a_sweep_whose_trial_cannot_fit_fails_before_tune_starts(cluster):
    from deo.tune.sweep import check_trial_fits

    base = to_dict(build_config(PretrainConfig))
    sweep = build_config(SweepConfig, overrides=["resources.num_workers=2", "resources.cpus_per_worker=1"])
    check_trial_fits(build_config(SweepConfig, overrides=["resources.num_workers=2"]), base)  # 2 x 0.5 + 0.01
    with pytest.raises(ConfigError, match=r"resources.num_workers=2 x resources.cpus_per_worker \+ "
                                          r"resources.trainable_cpus needs 2.01 CPU"):
        check_trial_fits(sweep, base)
    with pytest.raises(ConfigError, match=r"needs 2 GPU but the Ray cluster has 0"):
        check_trial_fits(build_config(SweepConfig, overrides=["resources.num_workers=2", "resources.use_gpu=true"]),
                         base)


def test_relative_outputs_under_ray_job_submit_are_warned_about(monkeypatch, capsys):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert not warn_if_job_scratch("output", "runs/shards")  # not a job: the user's own cwd
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}')
    for uri in ("s3://b/runs", "/data/runs", "file:///data/runs"):
        assert not warn_if_job_scratch("run.storage", uri)
    assert capsys.readouterr().err == ""
    assert warn_if_job_scratch("run.storage", "runs")
    assert "warning: run.storage='runs' is relative: under `ray job submit`" in capsys.readouterr().err


def test_the_default_data_ingested_under_a_job_is_warned_about_by_its_pretrain_key(monkeypatch, capsys, tmp_path):
    """`ray job submit -- python pipelines/pretrain.py` ingests the samples into its scratch copy: the
    warning names `data`, the key the user can change (it named the ingest's `output`)."""
    import deo.ingest.run as ingest_run
    from deo.train import driver

    seen = {}
    monkeypatch.setattr(driver, "_init_ray", lambda cfg: None)
    monkeypatch.setattr(ingest_run, "ingest", lambda cfg, log=print: seen.update(output=cfg.output))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}')
    driver.ensure_default_data(build_config(PretrainConfig, overrides=[f"data={driver.DEFAULT_DATA}"]))
    err = capsys.readouterr().err
    assert f"warning: data='{driver.DEFAULT_DATA}' is relative: under `ray job submit`" in err
    assert "output=" not in err
    assert seen["output"] == str(tmp_path / driver.DEFAULT_DATA)


def test_a_ray_client_or_dashboard_address_is_refused_naming_where_it_came_from(monkeypatch):
    """Ray Client (ray://, and Ray reads any scheme so) cannot drive Ray Train or Tune (it asserted deep
    inside Ray's autoscaler query); an http:// dashboard address, as Ray's job docs export, belongs to
    `ray job submit`."""
    from deo.cluster import start_or_join

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail(f"ray.init({kw}) called"))
    with pytest.raises(ConfigError, match=r"^scaling.address=ray://head:10001: Ray Client and dashboard "
                                          r"addresses \(scheme://\) cannot run this pipeline; .*ray job submit "
                                          r"--address http://<head>:8265"):
        start_or_join("ray://head:10001")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ConfigError, match=r"^RAY_ADDRESS=http://127.0.0.1:8265: Ray Client and dashboard"):
        start_or_join()
    with pytest.raises(ConfigError, match=r"^scaling.address=ray://h:1: "):  # the key wins over RAY_ADDRESS
        start_or_join("ray://h:1")


def test_which_ray_start_or_join_connects_to(monkeypatch, capsys):
    """An explicit address is used as given; RAY_ADDRESS=local or none, with no live recorded cluster, start
    a local Ray with at least 1 CPU; a live recorded cluster is joined through Ray's own lookup (no
    address: Ray then also turns on token auth as that cluster has it); a stale one is named and skipped."""
    from ray._private import services

    from deo.cluster import start_or_join

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append({k: kw.get(k) for k in ("address", "num_cpus")}))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("C", (), {"gcs_address": "127.0.0.1:1"})())
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: "10.0.0.5:6379")
    live = {"10.0.0.5:6379"}
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset(live))
    services.find_gcs_addresses.cache_clear = lambda: None
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    start_or_join("10.0.0.9:6379")
    start_or_join()  # a worker node's raylet here serves the recorded (remote) head
    monkeypatch.setenv("RAY_ADDRESS", "local")
    start_or_join()
    monkeypatch.delenv("RAY_ADDRESS")
    live.clear()  # killed, not stopped
    start_or_join()
    assert calls[0] == {"address": "10.0.0.9:6379", "num_cpus": None}
    assert calls[1] == {"address": None, "num_cpus": None}
    assert calls[2]["address"] == calls[3]["address"] == "local" and calls[2]["num_cpus"] >= 1
    assert "names a Ray cluster at 10.0.0.5:6379 that no Ray process on this machine serves" in capsys.readouterr().err
