"""cluster/local-fake.yaml on Ray's fake multi-node provider: the autoscaler adds pool nodes for work
the head cannot run, the work runs on them, and idle nodes are removed.

Ray's ``ray.cluster_utils.AutoscalingCluster`` is not used: in Ray 2.60 it reads
``fake_multi_node/example.yaml``, which the wheel does not ship, and its start/stop run
``ray stop --force``, which kills every Ray process on the (shared) machine. The test starts the head
the same way (``ray start --head --autoscaling-config``, ``RAY_FAKE_CLUSTER=1``) in its own process
group and ends exactly that group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port

from deo.cluster import INGEST_RESOURCE, TRAIN_RESOURCE

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# The driver: waits for nothing but its own work. Ingestion tasks and training actors request the
# pools' resources, report where they ran, then the driver waits until the autoscaler removed the
# idle nodes again. Fractional CPUs keep the 2 real cores enough for everything.
DRIVER = r"""
import json, sys, time
import ray

ray.init(address=sys.argv[1], log_to_driver=False)
ingest, train = sys.argv[2], sys.argv[3]
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

@ray.remote(num_cpus=0.25, resources={train: 1})
class TrainWorker:
    def node(self):
        return ray.get_runtime_context().get_node_id()

barrier = Barrier.remote()
tasks = [ingest_task.remote(barrier) for _ in range(2)]
actors = [TrainWorker.remote() for _ in range(2)]
ingest_nodes = ray.get(tasks, timeout=120)
train_nodes = ray.get([a.node.remote() for a in actors], timeout=120)
t_up = time.time() - t0
peak = [
    {"id": n["NodeID"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]
]
for a in [*actors, barrier]:
    ray.kill(a)
deadline = time.time() + 90
while time.time() < deadline:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) == 1:
        break
    time.sleep(1)
print("RESULT " + json.dumps({
    "ingest_nodes": ingest_nodes, "train_nodes": train_nodes, "peak": peak,
    "after": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
    "head": ray.get_runtime_context().get_node_id(), "t_up": t_up, "t_down": time.time() - t0 - t_up,
}))
"""


@pytest.fixture
def fake_cluster():
    """Head of cluster/local-fake.yaml on loopback; yields its GCS address, then ends its group."""
    config = yaml.safe_load((REPO / "cluster" / "local-fake.yaml").read_text())
    port = free_port()
    # The provider starts worker raylets against this GCS address (its default is port 6379).
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    tmp = Path(tempfile.mkdtemp(prefix="deo-fake-", dir="/tmp"))  # short: Unix socket paths
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    ray_bin = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=0",
            "--include-dashboard=false",
            f"--temp-dir={tmp / 'r'}",
            f"--autoscaling-config={tmp / 'config.yaml'}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the head, the monitor and the fake nodes it launches: one group
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        time.sleep(1)
        try:  # stragglers of the group (fake nodes' raylets)
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)


def test_fake_cluster_scales_pools_up_and_down(fake_cluster: str) -> None:
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, fake_cluster, INGEST_RESOURCE, TRAIN_RESOURCE],
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
    # Two training workers fit one training node (2 deo_train units), never an ingestion node.
    assert len(set(r["train_nodes"])) == 1
    assert by_id[r["train_nodes"][0]].get(TRAIN_RESOURCE) == 2.0
    assert len(r["peak"]) == 4  # head + 2 ingestion + 1 training node
    # Idle nodes were removed: only the head is left.
    assert r["after"] == [head], r
    print(
        f"scale-up+work {r['t_up']:.1f}s, scale-down {r['t_down']:.1f}s, total {time.time() - t0:.1f}s"
    )
