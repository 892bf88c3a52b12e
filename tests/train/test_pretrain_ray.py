"""pipelines/pretrain.py on real Ray: CLI, resume, 1 vs 2 workers, ray job submit on S3, lost node."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from deo.config import build_config, read_yaml
from deo.train.config import PretrainConfig

from conftest import free_port, run_cli, stop_process_group
from tests_helpers import REPO, metric_lines

TINY = ["train.batch_size=8", "views.n_local=2", "run.log_every=1", "run.tensorboard=false",
        "train.warmup_steps=2"]


def test_bad_configs_fail_before_any_worker_starts(sample_shards, tmp_path):
    cases = [
        (["loss.gama=1"], "unknown config key 'loss.gama'"),
        (["train.max_steps=lots"], "train.max_steps"),
        ([f"data={tmp_path}/nothing"], "no manifest.json"),
        (["train.batch_size=15", "scaling.num_workers=2"], "divisible by scaling.num_workers"),
        (["teacher.weights=/no/such/dinov3.safetensors"], "teacher.weights"),
    ]
    for args, message in cases:
        t0 = time.perf_counter()
        r = run_cli(["pipelines/pretrain.py", f"data={sample_shards}", f"run.storage={tmp_path}", *args])
        assert r.returncode != 0, args
        assert message in r.stderr, (args, r.stderr[-2000:])
        assert "Started a local Ray instance" not in r.stdout + r.stderr
        assert time.perf_counter() - t0 < 60
    # shards whose bands differ from the model's
    bad = tmp_path / "bad_bands"
    bad.mkdir()
    manifest = json.loads((sample_shards / "manifest.json").read_text())
    manifest["bands"]["ms"] = manifest["bands"]["ms"][:-1] + ["B01"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    r = run_cli(["pipelines/pretrain.py", f"data={bad}", f"run.storage={tmp_path}"])
    assert r.returncode != 0 and "B01" in r.stderr and str(bad) in r.stderr, r.stderr[-2000:]
    # a shard cut short (an interrupted copy): named by the driver, not by every worker in turn
    cut = tmp_path / "cut"
    shutil.copytree(sample_shards, cut)
    first = cut / json.loads((cut / "manifest.json").read_text())["files"][0]
    first.write_bytes(first.read_bytes()[:100_000])
    r = run_cli(["pipelines/pretrain.py", f"data={cut}", f"run.storage={tmp_path}"])
    assert r.returncode != 0 and f"shard {first} is not a readable Parquet file" in r.stderr, r.stderr[-2000:]
    assert "Started a local Ray instance" not in r.stdout + r.stderr


def test_a_cluster_with_other_nodes_needs_object_storage_for_what_workers_write(monkeypatch, capsys):
    """run.storage (and a sweep's storage) on a multi-node or autoscaling cluster must be object storage:
    checked for run.storage only and with live nodes only before, so file:// and a cluster whose
    autoscaler had not added the GPU nodes yet passed."""
    import ray

    from deo import cluster as ray_cluster
    from deo.cluster import check_cluster_storage
    from deo.config import ConfigError

    def cluster(nodes, autoscaler):
        monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}] * nodes)
        monkeypatch.setattr(ray_cluster, "autoscaler_present", lambda wait_s=0.0: autoscaler)

    cluster(1, False)
    check_cluster_storage({"run.storage": "/tmp/runs"}, {"data": "/tmp/shards"})  # one machine: fine
    for nodes, autoscaler, where in ((3, False, "has 3 nodes"), (1, True, "autoscaler adds nodes")):
        cluster(nodes, autoscaler)
        for uri in ("runs", "/tmp/runs", "file:///tmp/runs"):
            with pytest.raises(ConfigError, match=f"run.storage='{uri}' is a local path but the cluster.*{where}"):
                check_cluster_storage({"run.storage": uri}, {})
        check_cluster_storage({"storage": "s3://b/sweeps"}, {"data": "/mnt/shared/shards"})
        assert "data='/mnt/shared/shards' is a local path" in capsys.readouterr().err


@pytest.mark.ray
def test_cli_end_to_end_then_rerun_is_a_no_op(sample_shards, tmp_path):
    args = ["pipelines/pretrain.py", f"data={sample_shards}", f"run.storage={tmp_path}", "run.name=e2e",
            "train.max_steps=4", "run.checkpoint_every=2", *TINY]
    r = run_cli(args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "=== pretraining summary ===" in r.stdout and "images/s" in r.stdout
    progress = [line for line in (r.stdout + r.stderr).splitlines() if "/4 | " in line]
    assert progress and len(progress) == len(set(progress)), progress  # each printed once
    folder = tmp_path / "e2e"
    assert [x["step"] for x in metric_lines(folder)] == [1, 2, 3, 4]
    assert (folder / "backbone.safetensors").exists() and (folder / "config.yaml").exists()
    assert sorted(p.name for p in folder.glob("checkpoint_0*")) == ["checkpoint_00000002", "checkpoint_00000004"]
    again = run_cli(args)
    assert again.returncode == 0 and "already finished at step 4" in again.stdout
    assert "warning" not in again.stderr, again.stderr[-2000:]
    changed = run_cli([*args, "loss.gamma=0.5"])  # finished: the new weight trains nothing, and it says so
    assert changed.returncode == 0 and "already finished at step 4" in changed.stdout
    assert "already finished under another config" in changed.stderr and "loss.gamma: 1.0 -> 0.5" in changed.stderr


@pytest.mark.ray
def test_ctrl_c_stops_the_run_saying_where_a_rerun_resumes(sample_shards, tmp_path):
    """Ray Train's own SIGINT handler aborted the run and the driver exited 1 without a word."""
    proc = subprocess.Popen([sys.executable, "pipelines/pretrain.py", f"data={sample_shards}",
                             f"run.storage={tmp_path}", "run.name=cc", "train.max_steps=400",
                             "run.checkpoint_every=2", *TINY], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    state = tmp_path / "cc/checkpoint_00000002/state.pt"
    deadline = time.time() + 240
    while time.time() < deadline and not state.exists() and proc.poll() is None:
        time.sleep(0.5)
    assert state.exists(), proc.communicate(timeout=60)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal signals the whole foreground group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:] + err[-3000:]
    line = next(x for x in err.splitlines() if x.startswith("interrupted: "))
    newest = max(p.parent.name for p in (tmp_path / "cc").glob("checkpoint_0*/state.pt"))
    assert line == (f"interrupted: {tmp_path}/cc stopped by Ctrl-C; rerun the same command to resume it "
                    f"from {newest}"), line


@pytest.mark.ray
def test_two_workers_give_the_losses_of_one_with_the_same_global_batch(sample_shards, tmp_path, ray_local):
    """Also with the student sharded over the two Ray Train workers (FSDP)."""
    from deo.train.driver import run_folder
    from deo.train.ray_glue import build_trainer

    losses = {}
    for name, workers, strategy in (("w1", 1, "ddp"), ("w2", 2, "ddp"), ("w2fsdp", 2, "fsdp")):
        cfg = build_config(PretrainConfig, read_yaml(REPO / "configs/pretrain/default.yaml"), [
            f"data={sample_shards}", f"run.storage={tmp_path}", f"run.name={name}", *TINY,
            "train.max_steps=3", "model.drop_path=0", "train.data_order=global",
            f"scaling.num_workers={workers}", f"scaling.strategy={strategy}", "scaling.cpus_per_worker=0.5",
            "run.export=false"])
        result = build_trainer(cfg, run_folder(cfg)).fit()
        assert result.error is None
        losses[name] = metric_lines(tmp_path / name)
    for other in ("w2", "w2fsdp"):
        for one, two in zip(losses["w1"], losses[other], strict=True):
            for term in ("loss", "compression", "coding_rate", "cls_cos", "pF_cos", "pmid_cos"):
                assert two[term] == pytest.approx(one[term], rel=2e-3, abs=2e-4), (other, one["step"], term)


@pytest.fixture
def ray_head(s3_server, tmp_path):
    """A `ray start --head` of our own (own process group, killed by id), dashboard for jobs."""
    import tempfile

    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix socket paths must fit 107 chars
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
         f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
         "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
         f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while time.time() < deadline:
        r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "job", "list",
                            "--address", address], capture_output=True, text=True, env=env)
        if r.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("ray head did not start")
    yield address
    stop_process_group(proc)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray
def test_pretrain_joins_the_cluster_ray_start_left_running_and_checks_its_resources(sample_shards, tmp_path):
    """With no address, pretraining joins the cluster a `ray start` left on this machine, as ingest and
    Ray itself do (it used to crash there: Ray refuses num_cpus when joining), and refuses up front
    workers that the cluster can never hold (Ray Train used to wait for them forever)."""
    import tempfile

    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's unix socket paths must fit 107 chars
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--resources", json.dumps({"deo_here": 1}), "--include-dashboard=false"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while not os.path.exists(os.path.join(ray_tmp, "ray", "ray_current_cluster")):
            assert time.time() < deadline and head.poll() is None, "ray start did not come up"
            time.sleep(1)
        base = ["pipelines/pretrain.py", f"data={sample_shards}", f"run.storage={tmp_path}", "train.max_steps=2",
                "run.checkpoint_every=2", *TINY]
        r = subprocess.run([sys.executable, *base, "run.name=joined", "scaling.worker_resources={deo_here: 1}"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]  # only that cluster has deo_here
        assert [x["step"] for x in metric_lines(tmp_path / "joined")] == [1, 2]
        t0 = time.time()
        r = subprocess.run([sys.executable, *base, "run.name=never", "scaling.num_workers=4"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode != 0 and time.time() - t0 < 120
        assert "scaling.num_workers=4 x scaling.cpus_per_worker needs 4 CPU but the Ray cluster has 2" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        stop_process_group(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.ray
def test_a_stale_address_file_from_a_killed_cluster_starts_a_local_ray(tmp_path):
    """A `ray start` cluster killed rather than stopped (or a crashed ray.cluster_utils run, as in CI)
    leaves Ray's address file behind; ray.init then waited for that dead cluster and failed to connect.
    The pipelines start a local Ray instead, saying why."""
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's unix socket paths must fit 107 chars
    dead = f"127.0.0.1:{free_port()}"
    os.makedirs(os.path.join(ray_tmp, "ray"))
    with open(os.path.join(ray_tmp, "ray", "ray_current_cluster"), "w") as f:
        f.write(dead)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp)
    code = ("import ray; from deo.cluster import start_or_join; start_or_join(); "
            "print(ray.get_runtime_context().gcs_address, ray.cluster_resources()['CPU']); ray.shutdown()")
    try:
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        address, cpus = r.stdout.split()[-2:]
        assert address != dead and float(cpus) >= 1 and time.time() - t0 < 60
        assert f"names a Ray cluster at {dead} that no Ray process on this machine serves" in r.stderr
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_writes_the_run_folder_to_s3(sample_shards, s3_server, s3_bucket, ray_head):
    import s3fs

    data = s3_server.upload_dir(sample_shards, f"{s3_bucket}/shards")
    runs = f"{s3_bucket}/runs"
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    r = subprocess.run(
        [ray_bin, "job", "submit", "--address", ray_head, "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps({"excludes": [".venv", "runs", "data"]}), "--",
         "python", "pipelines/pretrain.py", f"data={data}", f"run.storage={runs}", "run.name=job",
         "train.max_steps=3", "run.checkpoint_every=3", *TINY],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(runs.removeprefix("s3://") + "/job")}
    assert {"config.yaml", "metrics.jsonl", "backbone.safetensors", "checkpoint_00000003"} <= names
    lines = fs.cat(runs.removeprefix("s3://") + "/job/metrics.jsonl").decode().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]


@pytest.mark.ray
@pytest.mark.slow
def test_losing_a_node_mid_run_resumes_from_the_checkpoint(sample_shards, tmp_path):
    script = REPO / "tests" / "train" / "node_loss_run.py"
    r = subprocess.run([sys.executable, str(script), str(sample_shards), str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["removed_after_step"] >= 2
    steps = [x["step"] for x in metric_lines(tmp_path / "nodeloss")]
    assert steps == list(range(1, report["max_steps"] + 1))  # resumed: nothing repeated or skipped
    # the restarted worker group resumed from a checkpoint at least as new as the last complete one when
    # the node died (its "resuming" line is not always forwarded to the driver's stdout once the node
    # that held the first worker is gone: read the run folder)
    summary = json.loads((tmp_path / "nodeloss" / "summary.json").read_text())
    assert report["removed_after_step"] <= summary["start_step"] < report["max_steps"], summary
    assert summary["steps"] == report["max_steps"]


@pytest.mark.ray
def test_rerun_with_another_number_of_workers_resumes_the_run(sample_shards, tmp_path):
    common = ["pipelines/pretrain.py", f"data={sample_shards}", f"run.storage={tmp_path}", "run.name=rw",
              "run.checkpoint_every=2", "scaling.cpus_per_worker=0.5", "run.export=false", *TINY]
    first = run_cli([*common, "train.max_steps=4", "scaling.num_workers=1"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = run_cli([*common, "train.max_steps=8", "scaling.num_workers=2"])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming" in second.stdout + second.stderr and "at step 4" in second.stdout + second.stderr
    lines = metric_lines(tmp_path / "rw")
    assert [x["step"] for x in lines] == list(range(1, 9))  # nothing repeated or skipped
    assert all(x["epoch"] >= 0 for x in lines)
    # the newest checkpoint, registered with Ray, damaged afterwards: the rerun names it, resumes from
    # the one before (it stopped with Ray's raw unpickling error, 4 times over, naming no file)
    state = tmp_path / "rw" / "checkpoint_00000008" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    third = run_cli([*common, "train.max_steps=10", "scaling.num_workers=2"])
    out = third.stdout + third.stderr
    assert third.returncode == 0, out[-5000:]
    assert f"checkpoint {tmp_path}/rw/checkpoint_00000008/state.pt is unreadable" in out and "at step 6" in out
    assert [x["step"] for x in metric_lines(tmp_path / "rw")] == list(range(1, 11))
