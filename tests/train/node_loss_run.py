"""Run by test_pretrain_ray.py in its own process: a 2-node Ray cluster loses its training node.

Prints one JSON line: {"removed_after_step": N, "max_steps": M}. Worker logs (with the loop's
"resuming ... at step" line after the restart) go to stdout too.
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from deo.config import build_config, read_yaml  # noqa: E402
from deo.train.checkpoint import latest_checkpoint  # noqa: E402
from deo.train.config import PretrainConfig  # noqa: E402
from deo.train.driver import run_folder  # noqa: E402
from deo.train.ray_glue import build_trainer  # noqa: E402

shards, tmp = sys.argv[1], sys.argv[2]
MAX_STEPS = 30
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
train_node = cluster.add_node(num_cpus=1, resources={"deo_train": 1}, node_ip_address="127.0.0.1")
ray.init(address=cluster.address, log_to_driver=True)
cfg = build_config(PretrainConfig, read_yaml(REPO / "configs/pretrain/default.yaml"), [
    f"data={shards}", f"run.storage={tmp}", "run.name=nodeloss", f"train.max_steps={MAX_STEPS}",
    "run.checkpoint_every=2", "run.log_every=1", "run.tensorboard=false", "run.export=false",
    "train.batch_size=8", "views.n_local=2", "scaling.cpus_per_worker=1",
    "scaling.worker_resources={deo_train: 1}", "scaling.max_failures=3"])
run_uri = run_folder(cfg)
box: dict = {}
thread = threading.Thread(target=lambda: box.update(result=build_trainer(cfg, run_uri).fit()))
thread.start()
deadline = time.time() + 300
while latest_checkpoint(run_uri) is None and time.time() < deadline:
    time.sleep(0.2)
latest = latest_checkpoint(run_uri)
assert latest is not None, "no checkpoint appeared"
removed_after = int(latest.rsplit("_", 1)[1])
cluster.remove_node(train_node)  # the node with the training worker dies
time.sleep(3)
cluster.add_node(num_cpus=1, resources={"deo_train": 1}, node_ip_address="127.0.0.1")  # a replacement
thread.join(timeout=400)
result = box["result"]
if result.error:
    raise result.error
ray.shutdown()
cluster.shutdown()
print(json.dumps({"removed_after_step": removed_after, "max_steps": MAX_STEPS}), flush=True)
