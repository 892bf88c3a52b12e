"""cluster/local-fake.yaml on Ray's fake multi-node provider: the autoscaler adds pool nodes for work
the head cannot run (ingestion tasks; a 2-worker pretraining job), the work runs on them, and idle nodes
are removed.

Ray's ``ray.cluster_utils.AutoscalingCluster`` is not used: in Ray 2.60 it reads
``fake_multi_node/example.yaml``, which the wheel does not ship, and its start/stop run
``ray stop --force``, which kills every Ray process on the (shared) machine. The test starts the head
the same way (``ray start --head --autoscaling-config``, ``RAY_FAKE_CLUSTER=1``) in its own process
group and ends exactly that group. The fake nodes are raylets the autoscaler's monitor starts, so they
inherit the environment of that ``ray start`` (the S3 endpoint included).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from deo.cluster import INGEST_RESOURCE, TRAIN_RESOURCE

from conftest import REPO, S3Server, free_port, stop_process_group

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY = str(Path(sys.executable).with_name("ray"))

# The ingestion driver: two tasks that request the CPU pool and must run at once, then it waits until
# the autoscaler removed the idle nodes again. Fractional CPUs keep the 2 real cores enough.
INGEST_DRIVER = r"""
import json, sys, time
import ray

ray.init(address=sys.argv[1], log_to_driver=False)
ingest = sys.argv[2]
t0 = time.time()

@ray.remote(num_cpus=0)
class Barrier:
    def __init__(self):
        self.n = 0
    def arrive(self):
        self.n += 1
    def count(self):
        return self.n

@ray.remote(num_cpus=0.5, resources={ingest: 1})
def ingest_task(barrier):
    # Both tasks must run at once (one deo_ingest unit per node), so one node cannot serve them in turn.
    ray.get(barrier.arrive.remote())
    deadline = time.time() + 90
    while ray.get(barrier.count.remote()) < 2 and time.time() < deadline:
        time.sleep(0.2)
    return ray.get_runtime_context().get_node_id()

barrier = Barrier.remote()
ingest_nodes = ray.get([ingest_task.remote(barrier) for _ in range(2)], timeout=120)
t_up = time.time() - t0
peak = [{"id": n["NodeID"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]]
ray.kill(barrier)
deadline = time.time() + 90
while time.time() < deadline and len([n for n in ray.nodes() if n["Alive"]]) > 1:
    time.sleep(1)
print("RESULT " + json.dumps({
    "ingest_nodes": ingest_nodes, "peak": peak,
    "after": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
    "head": ray.get_runtime_context().get_node_id(), "t_up": t_up, "t_down": time.time() - t0 - t_up,
}))
"""


@dataclass
class FakeCluster:
    """Addresses of a running fake cluster."""

    gcs: str
    dashboard: str


@pytest.fixture(scope="module")
def fake_cluster(s3_server: S3Server) -> Iterator[FakeCluster]:
    """Head of cluster/local-fake.yaml on loopback with the job server; ends its process group after.

    One head for the module: each test waits until the idle nodes are gone, so the next starts from the
    head alone.
    """
    config = yaml.safe_load((REPO / "cluster" / "local-fake.yaml").read_text())
    port, dash = free_port(), free_port()
    # The provider starts worker raylets against this GCS address (its default is port 6379).
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    tmp = Path(tempfile.mkdtemp(prefix="deo-fake-", dir="/tmp"))  # short: Unix socket paths
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    env = dict(
        os.environ,
        **s3_server.env,  # the fake nodes' workers read and write the run on this S3
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
        # A job's `python` is the one on PATH where `ray start` ran: this venv's.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=0",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--temp-dir={tmp / 'r'}",
            f"--autoscaling-config={tmp / 'config.yaml'}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the head, the monitor and the fake nodes it launches: one group
    )
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while (
            subprocess.run(
                [RAY, "job", "list", "--address", address], capture_output=True, env=env
            ).returncode
            != 0
        ):
            if time.time() > deadline or head.poll() is not None:
                pytest.fail("the fake cluster's head did not start")
            time.sleep(1)
        yield FakeCluster(gcs=f"127.0.0.1:{port}", dashboard=address)
    finally:
        stop_process_group(head, grace_s=3)
        shutil.rmtree(tmp, ignore_errors=True)


def alive_nodes(dashboard: str) -> dict[str, dict[str, float]]:
    """Node id -> advertised resources of every alive node (Ray's state API over HTTP)."""
    from ray.util.state import list_nodes

    nodes = list_nodes(
        address=dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False
    )
    return {n.node_id: dict(n.resources_total) for n in nodes}


def wait_for_head_alone(dashboard: str, timeout: float = 90) -> dict[str, dict[str, float]]:
    """The alive nodes once only one is left (or whatever is alive after ``timeout`` seconds)."""
    deadline = time.time() + timeout
    nodes = alive_nodes(dashboard)
    while len(nodes) > 1 and time.time() < deadline:
        time.sleep(1)
        nodes = alive_nodes(dashboard)
    return nodes


def test_fake_cluster_scales_the_ingestion_pool_up_and_down(fake_cluster: FakeCluster) -> None:
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-c", INGEST_DRIVER, fake_cluster.gcs, INGEST_RESOURCE],
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, RAY_ADDRESS=""),
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"driver failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    r = json.loads(lines[0][len("RESULT ") :])
    by_id = {n["id"]: n["resources"] for n in r["peak"]}
    head = r["head"]
    # The head advertises no pool resource: all work ran on nodes the autoscaler added.
    assert INGEST_RESOURCE not in by_id[head] and TRAIN_RESOURCE not in by_id[head]
    # Two concurrent ingestion tasks, one deo_ingest unit per node: two distinct ingestion nodes.
    assert len(set(r["ingest_nodes"])) == 2 and head not in r["ingest_nodes"]
    assert all(by_id[n].get(INGEST_RESOURCE) == 1.0 for n in r["ingest_nodes"])
    # Only the ingestion pool grew: head + 2 ingestion nodes, no training node.
    assert len(r["peak"]) == 3 and not any(TRAIN_RESOURCE in res for res in by_id.values())
    # Idle nodes were removed: only the head is left.
    assert r["after"] == [head], r
    print(
        f"scale-up+work {r['t_up']:.1f}s, scale-down {r['t_down']:.1f}s, total {time.time() - t0:.1f}s"
    )


def test_pretraining_job_scales_the_training_pool_up_and_down(
    fake_cluster: FakeCluster,
    s3_server: S3Server,
    s3_bucket: str,
    sample_shards: Path,
    tmp_path: Path,
) -> None:
    import s3fs
    from ray.util.state import list_actors

    data = s3_server.upload_dir(sample_shards, f"{s3_bucket}/shards")
    runs = f"{s3_bucket}/runs"
    before = wait_for_head_alone(fake_cluster.dashboard)
    assert len(before) == 1, before  # the head alone
    (head,) = before
    assert TRAIN_RESOURCE not in before[head]

    # Two workers, each asking for a deo_train unit the head does not have.
    t0 = time.time()
    log = tmp_path / "job.log"
    with log.open("w") as out:
        job = subprocess.Popen(
            [
                RAY,
                "job",
                "submit",
                "--address",
                fake_cluster.dashboard,
                "--working-dir",
                str(REPO),
                "--runtime-env-json",
                json.dumps({"excludes": [".venv", "runs", "data"]}),
                "--",
                "python",
                "pipelines/pretrain.py",
                f"data={data}",
                f"run.storage={runs}",
                "run.name=fake",
                "scaling.num_workers=2",
                "scaling.cpus_per_worker=0.5",
                f"scaling.worker_resources={{{TRAIN_RESOURCE}: 1}}",
                "train.max_steps=4",
                "train.batch_size=8",
                "views.n_local=2",
                "run.log_every=1",
                "run.tensorboard=false",
                "run.checkpoint_every=4",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, RAY_AUTH_MODE="disabled"),
        )
        peak: dict[str, dict[str, float]] = {}
        while job.poll() is None and time.time() - t0 < 240:
            peak.update(alive_nodes(fake_cluster.dashboard))
            time.sleep(1)
        if job.poll() is None:
            job.kill()
            job.wait()
    t_job = time.time() - t0
    text = log.read_text()
    assert job.returncode == 0 and "succeeded" in text.lower(), text[-5000:]

    # The autoscaler added two training nodes (one deo_train unit each) and nothing else.
    added = {n: res for n, res in peak.items() if n != head}
    assert len(added) == 2, peak
    assert all(
        res.get(TRAIN_RESOURCE) == 1.0 and INGEST_RESOURCE not in res for res in added.values()
    )
    # The two Ray Train workers ran there, one per added node: training across nodes.
    workers = list_actors(
        address=fake_cluster.dashboard,
        filters=[("class_name", "=", "RayTrainWorker")],
        detail=True,
        raise_on_missing_output=False,
    )
    assert sorted(w.node_id for w in workers) == sorted(added), (workers, added)

    # The run folder on S3: every step logged once, the exported backbone.
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})
    run = runs.removeprefix("s3://") + "/fake"
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(run)}
    assert {"metrics.jsonl", "backbone.safetensors", "checkpoint_00000004"} <= names, names
    records = [
        json.loads(x) for x in fs.cat(f"{run}/metrics.jsonl").decode().splitlines() if x.strip()
    ]
    assert [x["step"] for x in records] == [1, 2, 3, 4]
    assert all(x["loss"] == x["loss"] and abs(x["loss"]) < 1e6 for x in records)  # finite
    assert fs.size(f"{run}/backbone.safetensors") > 100_000

    # Idle training nodes are removed (idle_timeout_minutes: 0.25 in cluster/local-fake.yaml).
    t1 = time.time()
    assert list(wait_for_head_alone(fake_cluster.dashboard)) == [head]
    print(f"job (scale-up + 4 steps) {t_job:.1f}s, scale-down {time.time() - t1:.1f}s")
