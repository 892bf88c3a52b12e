"""Starting or joining Ray, and what every pipeline checks of the cluster before any work starts.

Ingest, pretraining and sweeps start Ray the same way (:func:`start_or_join`): the cluster at
``scaling.address`` or ``RAY_ADDRESS`` (set inside a ``ray job submit`` driver), else the one a ``ray start``
left running on this machine, else a new local Ray. Then they fail fast, naming the config key, where Ray
would otherwise wait forever or lose the output:

- :func:`check_resources`: tasks or workers ask for more of a resource (a custom pool resource such as
  ``deo_train``, GPUs, CPUs) than the cluster has, and no autoscaler can add nodes that have it;
- :func:`check_cluster_storage`: workers would write to a local path on a cluster with other nodes;
- :func:`warn_if_job_scratch`: a relative output path under ``ray job submit`` lands in Ray's temporary
  copy of the working dir, which Ray deletes when the job no longer needs it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

from deo.config import ConfigError
from deo.io import storage


def start_or_join(address: str = "", log_to_driver: bool = True) -> None:
    """Connect this process to Ray (nothing when it already is).

    Args:
        address: a Ray address; empty: ``RAY_ADDRESS``, else the cluster ``ray start`` left running on
            this machine, else a new local Ray with this machine's CPUs (Ray's own cgroup-aware count).
        log_to_driver: stream the workers' output to this process.
    """
    import ray

    if ray.is_initialized():
        return
    # the dashboard (when this starts Ray) serves the state API, which Ray Train's placement-group
    # cleaner and Tune use to watch their actors; joining a cluster ignores it
    ray.init(address=address or None, include_dashboard=True, configure_logging=False,
             log_to_driver=log_to_driver)


def autoscaler_present() -> bool:
    """Whether the connected cluster has an autoscaler that can launch nodes (not Ray's read-only one).

    A plain ``ray start``/``ray.init`` head also runs the autoscaler monitor, with a read-only provider
    whose node types are the live nodes themselves (named ``node_<node id>``); a launched cluster
    (``ray up``, KubeRay, ``cluster/local-fake.yaml``) names its node types in its config.
    """
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if is_autoscaler_v2(fetch_from_server=True):
        return True
    raw = _internal_kv_get("__autoscaling_status")
    if not raw:
        return False
    mapping = (json.loads(raw).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(t != f"node_{node}" for node, t in mapping.items())


def check_resources(needed: Mapping[str, float], keys: Mapping[str, str], fix: str = "") -> None:
    """Fail fast when the cluster can never grant ``needed`` (Ray would leave the request pending forever).

    Args:
        needed: resource -> amount the pipeline's tasks or workers ask for at once.
        keys: resource -> the config key(s) that asked for it, for the message.
        fix: what else to try, appended to the message.

    Raises:
        ConfigError: naming the key, when a resource is short on the cluster and no autoscaler can add
            nodes.
    """
    import ray

    have = ray.cluster_resources()
    short = {k: v for k, v in needed.items() if v > 0 and have.get(k, 0.0) < v}
    if not short or autoscaler_present():
        return
    custom = {k: v for k, v in have.items() if not k.startswith("node:") and k not in
              ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("accelerator_type:")}
    k, v = next(iter(short.items()))
    start = (f"start the nodes with --resources '{{\"{k}\": N}}', " if k not in ("CPU", "GPU") else "")
    raise ConfigError(
        f"{keys.get(k, k)} needs {v:g} {k} but the Ray cluster has {have.get(k, 0.0):g} and no autoscaler "
        f"to add nodes (custom resources here: {custom or 'none'}); {start}use a cluster from cluster/"
        + (f", or {fix}" if fix else "")
    )


def check_cluster_storage(written: dict[str, str], read: dict[str, str]) -> None:
    """Fail fast when workers would write to a local path of a cluster that has (or may grow) other nodes.

    Args:
        written: config key -> URI the workers write to (checkpoints, run folders): object storage
            required on such a cluster (a ``file://`` URI is a local path too).
        read: config key -> URI they read: a local path only gets a warning (a shared filesystem
            mounted on every node at the same path works).

    Raises:
        ConfigError: naming the key, when a ``written`` URI is local on a multi-node or autoscaling cluster.
    """
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes <= 1 and not autoscaler_present():
        return
    where = f"the cluster has {nodes} nodes" if nodes > 1 else "the cluster's autoscaler adds nodes"
    for key, uri in written.items():
        if not storage.is_remote(uri):
            raise ConfigError(f"{key}={uri!r} is a local path but {where}, whose workers cannot write "
                              "there for the others: use object storage (s3://, gs://)")
    for key, uri in read.items():
        if not storage.is_remote(uri):
            print(f"warning: {key}={uri!r} is a local path but {where}: every node must see it at that "
                  "path (a shared filesystem), or use object storage", file=sys.stderr, flush=True)


def warn_if_job_scratch(key: str, uri: str) -> bool:
    """Under ``ray job submit``, warn that a relative local ``uri`` (config ``key``) lands in the job's
    temporary copy of ``--working-dir``, which Ray deletes when the job no longer needs it; returns
    whether it warned."""
    if not os.environ.get("RAY_JOB_SUBMISSION_ID") or storage.is_remote(uri) \
            or os.path.isabs(storage.strip_file_scheme(uri)):
        return False
    print(f"warning: {key}={uri!r} is relative: under `ray job submit` it lands in Ray's temporary copy of "
          f"the working dir ({os.path.abspath(storage.strip_file_scheme(uri))}), which Ray deletes later; "
          f"give {key} an absolute path or object storage (s3://...)", file=sys.stderr, flush=True)
    return True
