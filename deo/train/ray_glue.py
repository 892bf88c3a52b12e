"""Ray Train glue: the per-worker function, its runtime, and the driver that builds the TorchTrainer.

Three small pieces, as in Ray's Train/Tune interop example: :func:`train_worker` runs on every worker,
:class:`RayRuntime` adapts Ray Train's context/checkpoint/report API to :class:`deo.train.runtime.Runtime`,
and :func:`build_trainer` turns a :class:`PretrainConfig` into a ``TorchTrainer``. Nothing else in deo
touches Ray Train.
"""

from __future__ import annotations

import os
from typing import Any

import ray.train
import ray.train.torch

from deo.config import build_config, to_dict
from deo.train import checkpoint as ckpt
from deo.train.config import PretrainConfig, ScalingConfig

# Environment that points storage clients at S3-compatible endpoints; forwarded to workers. Secrets
# (keys, tokens) are never forwarded: workers get credentials from their own environment or role.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_S3_ENDPOINT",
    "AWS_HTTPS", "AWS_VIRTUAL_HOSTING", "DEO_SHARED_DATA",
)


class RayRuntime:
    """:class:`deo.train.runtime.Runtime` on a Ray Train worker."""

    def __init__(self, run_uri: str) -> None:
        self.run_uri = run_uri
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def restore(self) -> dict[str, Any] | None:
        """Ray's latest registered checkpoint, else the newest readable one in the run folder.

        A worker lost right after persisting a checkpoint but before the controller registered it
        leaves a complete ``checkpoint_<step>`` that Ray does not know; resuming from it saves the
        steps since the previous one. An unreadable checkpoint, registered or not, is skipped for the
        newest one that loads.
        """
        checkpoint = ray.train.get_checkpoint()
        registered = None
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                try:
                    registered = ckpt.load_state(folder)
                except ckpt.UnreadableCheckpoint as e:  # damaged after Ray registered it: fall back below
                    print(f"skipping: {e}", flush=True)
        newest = ckpt.newest_readable_state(self.run_uri)
        if newest is not None and (registered is None or newest["step"] > registered["step"]):
            return newest
        return registered

    def save(self, state: dict[str, Any] | None, metrics: dict[str, Any], step: int) -> None:
        name = ckpt.checkpoint_name(step)
        if state is None:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        with ckpt.scratch_folder() as tmp:
            ckpt.save_state(state, tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=name)

    def report(self, metrics: dict[str, Any]) -> None:
        ray.train.report(metrics)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Per-worker entry point: rebuild the config and run the training loop."""
    from deo.train.loop import train

    cfg = build_config(PretrainConfig, loop_config["config"])
    train(cfg, RayRuntime(loop_config["run_uri"]), run_uri=loop_config["run_uri"])


def storage_path(uri: str) -> str:
    """Ray wants absolute local paths or URIs."""
    if "://" in uri and not uri.startswith("file://"):
        return uri
    return os.path.abspath(uri.removeprefix("file://"))


def worker_resources(s: ScalingConfig) -> dict[str, float]:
    """What each Ray Train worker asks for: its CPUs, GPUs when ``use_gpu``, and ``worker_resources``."""
    resources: dict[str, float] = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    resources.update(s.worker_resources)
    return resources


def build_trainer(cfg: PretrainConfig, run_uri: str, callbacks: list[Any] | None = None
                  ) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer for ``cfg`` (scaling, failure retries, checkpoints kept).

    Args:
        callbacks: Ray Train user callbacks, e.g. Tune's report callback inside a sweep trial.
    """
    s = cfg.scaling
    resources = worker_resources(s)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    # Ray 2.60's Train workers both print and log every print() (Ray's worker stdout is not
    # sys.__stdout__, so its print patch tees): each progress line would reach the driver twice.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    return ray.train.torch.TorchTrainer(
        train_worker,
        train_loop_config={"config": to_dict(cfg), "run_uri": run_uri},
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path(cfg.run.storage),
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
            callbacks=callbacks,
        ),
    )
