"""ray_resources: ingest tasks request the pool's custom resource; a resource no node has fails fast."""

from __future__ import annotations

import json
import textwrap

import pytest

from deo.config import build_config
from deo.ingest.config import IngestConfig

from conftest import REPO, run_cli

SCRIPT = textwrap.dedent("""
    import json, sys, time
    import ray
    from deo.config import build_config
    from deo.ingest.config import IngestConfig
    from deo.ingest.run import ingest
    ray.init(num_cpus=2, resources={"deo_ingest": 2}, include_dashboard=False, _node_ip_address="127.0.0.1",
             configure_logging=False, log_to_driver=False)
    s2, out = sys.argv[1], sys.argv[2]
    common = [f"s2=[{s2}]", "aerial=[]", "s2_band_order=eurosat", "use_ray=true"]
    summary = ingest(build_config(IngestConfig, overrides=[*common, f"output={out}",
                                                           "ray_resources={deo_ingest: 1}"]), log=print)
    t = time.perf_counter()
    try:
        ingest(build_config(IngestConfig, overrides=[*common, f"output={out}_x",
                                                     "ray_resources={deo_gpu_pool: 1}"]), log=print)
        error = None
    except ValueError as e:
        error = str(e)
    print("RESULT " + json.dumps({"summary": summary, "error": error, "seconds": time.perf_counter() - t}))
""")


@pytest.mark.ray
def test_ingest_tasks_get_the_custom_resource_and_a_missing_one_fails_naming_the_key(tmp_path, shared_data):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    res = run_cli([str(script), str(shared_data / "eurosat_ms" / "Forest"), str(out)], cwd=REPO, timeout=300,
                  env={"PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.split("RESULT ", 1)[1])
    summary = result["summary"]
    assert summary["mode"] == "ray" and summary["counts"]["ms"] == 24
    assert summary["task_resources"] == {"deo_ingest": 1.0}  # what Ray assigned to the shard tasks
    err = result["error"]
    assert err is not None and "ray_resources.deo_gpu_pool" in err and "no autoscaler" in err
    assert "deo_ingest" in err  # lists what the cluster does have
    assert result["seconds"] < 30  # failed up front, did not wait for a node that never comes


def test_ray_resources_config_checks():
    cfg = build_config(IngestConfig, overrides=["ray_resources={deo_ingest: 1}"])
    assert cfg.ray_resources == {"deo_ingest": 1}
    assert build_config(IngestConfig).ray_resources == {}
    with pytest.raises(ValueError, match="ray_resources.CPU"):
        build_config(IngestConfig, overrides=["ray_resources={CPU: 1}"])
    with pytest.raises(ValueError, match=r"ray_resources.deo_ingest must be > 0"):
        build_config(IngestConfig, overrides=["ray_resources={deo_ingest: 0}"])
    with pytest.raises(ValueError, match="needs use_ray=true"):
        build_config(IngestConfig, overrides=["ray_resources={deo_ingest: 1}", "use_ray=false"])
