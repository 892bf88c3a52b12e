"""Ray Data wiring of the ingest: sources -> plans (probe) and jobs -> shard files (tiles).

Rows travel as JSON strings (plans and summaries are nested and mixed-typed, which Arrow columns are
not). The UDFs are generators over one job at a time and write their shard themselves, so a worker
holds one window of pixels and never sends tiles through the object store. Each worker process keeps
its open datasets (:class:`RasterCache`) across tasks, and recreates the driver's storage environment
(S3 endpoint, credentials), which a Ray started before it was set would not have.

Cluster pools: every probe and job task requests ``ray_resources`` (e.g. ``{deo_ingest: 1}``, the
resource the CPU ingestion pool of ``cluster/*.yaml`` advertises), so ingestion lands on that pool and
its autoscaler scales it. Ray would leave a task asking for a resource no node has pending forever,
so :func:`deo.cluster.check_resources` fails first, naming the key, unless an autoscaler can add
such nodes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray

from deo.cluster import check_resources, start_or_join
from deo.config import build_config, to_dict
from deo.ingest.config import IngestConfig
from deo.ingest.run import probe, run_job
from deo.io.raster import RasterCache, apply_storage_env, storage_env

_CACHE: RasterCache | None = None


def _worker_cache(env: dict[str, str]) -> RasterCache:
    global _CACHE
    apply_storage_env(env)
    if _CACHE is None:
        _CACHE = RasterCache()
    return _CACHE


def _cfg(cfg_dict: dict[str, Any]) -> IngestConfig:
    return build_config(IngestConfig, cfg_dict)


def _probe_batch(batch: dict[str, np.ndarray], cfg: dict[str, Any], env: dict[str, str]
                 ) -> dict[str, np.ndarray]:
    cache = _worker_cache(env)
    config = _cfg(cfg)
    out = [json.dumps(probe(json.loads(s), config, cache)) for s in batch["source"]]
    return {"plan": np.array(out, dtype=object)}


def _job_batch(batch: dict[str, np.ndarray], cfg: dict[str, Any], env: dict[str, str]
               ) -> Iterator[dict[str, np.ndarray]]:
    cache = _worker_cache(env)
    config = _cfg(cfg)
    assigned = ray.get_runtime_context().get_assigned_resources()
    for s in batch["job"]:
        summary = run_job(json.loads(s), config, cache)
        summary["task_resources"] = assigned  # what Ray gave the task that ran it (pool placement)
        yield {"summary": np.array([json.dumps(summary)], dtype=object)}


def prepare(cfg: IngestConfig) -> None:
    """Start or join Ray and check that the cluster can run tasks requesting ``cfg.ray_resources``."""
    start_or_join(log_to_driver=False)
    check_resources(cfg.ray_resources, {k: f"ray_resources.{k}" for k in cfg.ray_resources},
                    fix="drop it from ray_resources")


def probe_all(sources: list[dict[str, Any]], cfg: IngestConfig) -> list[dict[str, Any]]:
    """Probe every source on Ray Data (scenes -> window plans), in input order."""
    if not sources:
        return []
    start_or_join(log_to_driver=False)
    items = [{"source": json.dumps(s)} for s in sources]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 8))
    out = ds.map_batches(_probe_batch, batch_size=16, fn_kwargs={"cfg": to_dict(cfg), "env": storage_env()},
                         resources=dict(cfg.ray_resources) or None)
    plans = [json.loads(r["plan"]) for r in out.take_all()]
    order = {s["uri"] + s["kind"]: i for i, s in enumerate(sources)}
    return sorted(plans, key=lambda p: order[p["uri"] + p["kind"]])


def run_jobs(jobs: list[dict[str, Any]], cfg: IngestConfig) -> Iterator[dict[str, Any]]:
    """Run jobs on Ray Data (windows -> tiles -> shard files); yields job summaries as they finish."""
    if not jobs:
        return
    start_or_join(log_to_driver=False)
    items = [{"job": json.dumps(j)} for j in jobs]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    out = ds.map_batches(_job_batch, batch_size=1, fn_kwargs={"cfg": to_dict(cfg), "env": storage_env()},
                         resources=dict(cfg.ray_resources) or None)
    for row in out.iter_rows():
        yield json.loads(row["summary"])


def to_ray_dataset(uri: str) -> ray.data.Dataset:
    """The shards of an ingest run as a Ray Dataset (tensor columns read as tensors).

    Raises:
        ValueError: the manifest's schema_version is not the one this deo reads.
    """
    from deo.io.shards import ShardDataset
    from deo.io.storage import pyarrow_filesystem

    shards = ShardDataset.open(uri)
    fs, _ = pyarrow_filesystem(uri)
    paths = [pyarrow_filesystem(f)[1] for f in shards.files]
    return ray.data.read_parquet(paths, filesystem=fs)
