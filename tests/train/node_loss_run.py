"""Run by test_pretrain_ray.py in its own process: a 2-node Ray cluster loses its training node.

Prints one JSON line: {"removed_after_step": N, "max_steps": M}, N being the step of the newest
complete checkpoint when the node was removed. Worker logs (with the loop's
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
from deo.io import storage  # noqa: E402
from deo.train.checkpoint import UnreadableCheckpoint, newest_readable  # noqa: E402
from deo.train.config import PretrainConfig  # noqa: E402
from deo.train.driver import run_folder  # noqa: E402
from deo.train.ray_glue import build_trainer  # noqa: E402


def complete_checkpoint_step(run_uri: str) -> int | None:
    """Step of the newest checkpoint whose state.pt loads, else None.

    state.pt exists from the moment Ray starts copying it into the run folder (in 1 MiB writes, 50 MB
    here): a node removed then leaves a truncated file that the restarted worker rightly skips, and,
    with no older checkpoint, it restarts at step 0 (what failed in CI). Wait for a whole one; on a slow
    disk the newest is often still being copied while an older one is whole (CI once saw only
    half-copied newest ones until the run was too far along, and crashed on one: load_state raises
    UnreadableCheckpoint for them).
    """
    try:
        found = newest_readable(run_uri, log=lambda _: None)  # skips the half-copied ones
    except (UnreadableCheckpoint, FileNotFoundError):  # none whole yet, or one pruned while listed
        return None
    return None if found is None else int(found[1]["step"])


shards, tmp = sys.argv[1], sys.argv[2]
MAX_STEPS = 30
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
try:  # shut down whatever fails: Cluster records its address in Ray's address file until then
    train_node = cluster.add_node(num_cpus=1, resources={"deo_train": 1}, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, log_to_driver=True)
    cfg = build_config(PretrainConfig, read_yaml(REPO / "configs/pretrain/default.yaml"), [
        f"data={shards}", f"run.storage={tmp}", "run.name=nodeloss", f"train.max_steps={MAX_STEPS}",
        "run.checkpoint_every=2", "run.log_every=1", "run.tensorboard=false", "run.export=false",
        "train.batch_size=8", "views.n_local=2", "scaling.cpus_per_worker=1",
        "scaling.worker_resources={deo_train: 1}", "scaling.max_failures=3"])
    run_uri = run_folder(cfg)
    box: dict = {}
    # a daemon: a failed check below ends the script at once instead of after the whole run
    thread = threading.Thread(target=lambda: box.update(result=build_trainer(cfg, run_uri).fit()), daemon=True)
    thread.start()
    deadline = time.time() + 300
    while (removed_after := complete_checkpoint_step(run_uri)) is None and time.time() < deadline:
        time.sleep(0.2)
    assert removed_after is not None, "no complete checkpoint appeared"
    # the node must die mid-run: the run has not finished and most of its steps are still to come
    assert not storage.exists(storage.join(run_uri, "summary.json")), "the run finished before the node loss"
    assert removed_after <= MAX_STEPS // 2, f"checkpoint {removed_after} of {MAX_STEPS}: too late for the test"
    cluster.remove_node(train_node)  # the node with the training worker dies
    time.sleep(3)
    cluster.add_node(num_cpus=1, resources={"deo_train": 1}, node_ip_address="127.0.0.1")  # a replacement
    thread.join(timeout=400)
    assert not thread.is_alive(), "the run did not finish within 400 s of the node loss"
    result = box["result"]
    if result.error:
        raise result.error
finally:
    ray.shutdown()
    cluster.shutdown()
print(json.dumps({"removed_after_step": removed_after, "max_steps": MAX_STEPS}), flush=True)
