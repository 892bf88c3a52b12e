"""The pretraining driver: validate everything before a worker starts, then run Ray Train.

``pipelines/pretrain.py`` calls :func:`pretrain`. Bad configs, missing data, shards whose bands differ
from the model's or unreadable teacher weights fail here, naming the key or file, not on a worker.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from deo.bands import DEO_BANDS
from deo.cluster import warn_if_job_scratch
from deo.config import ConfigError, build_config, config_changes, read_yaml
from deo.data.loader import check_shard_files
from deo.io import storage
from deo.io.shards import ShardDataset
from deo.train.config import PretrainConfig

DEFAULT_DATA = "runs/shards/samples"


class Interrupted(Exception):
    """Ctrl-C (SIGINT) stopped the run; rerunning the same command resumes it from its newest checkpoint."""


@dataclass
class PretrainResult:
    """What the driver prints and returns."""

    run_uri: str
    summary: dict[str, Any]
    resumed_finished: bool = False


def run_folder(cfg: PretrainConfig) -> str:
    """``<run.storage>/<run.name>`` (absolute for local storage)."""
    base = cfg.run.storage
    if "://" not in base or base.startswith("file://"):
        base = os.path.abspath(base.removeprefix("file://"))
    return storage.join(base, cfg.run.name)


PATH_KEYS = ("data", "probe.dataset", "teacher.weights", "model.init_from", "model.rgb_weights",
             "train.compile_cache")
"""Config keys holding local paths or URIs that workers open."""


def absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    """``cfg`` with relative local paths made absolute: Ray workers do not run in the driver's cwd."""
    import dataclasses

    changes: dict[str, dict[str, str]] = {}
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        if value and "://" not in value and not os.path.isabs(value):
            changes.setdefault(section, {})[name] = os.path.abspath(value)
    top = changes.pop("", {})
    sections = {sec: dataclasses.replace(getattr(cfg, sec), **vals) for sec, vals in changes.items()}
    return dataclasses.replace(cfg, **top, **sections)


def ensure_default_data(cfg: PretrainConfig) -> None:
    """The embedded default: ingest the committed samples when their shards are missing."""
    if cfg.data != DEFAULT_DATA or storage.exists(storage.join(cfg.data, "manifest.json")):
        return
    from deo.config import build_config
    from deo.ingest.config import IngestConfig
    from deo.ingest.run import ingest

    print(f"{cfg.data} not found: ingesting the committed samples first", flush=True)
    warn_if_job_scratch("data", cfg.data)  # the key the user sees (the ingest would name its `output`)
    _init_ray(cfg)  # ours, before the ingest's own: so the workers' logs reach this driver
    ingest(build_config(IngestConfig, overrides=[f"output={os.path.abspath(cfg.data)}"]))


def validate(cfg: PretrainConfig) -> ShardDataset:
    """Checks that need no worker: data, bands, teacher weights, storage. Raises ConfigError."""
    if not storage.exists(storage.join(cfg.data, "manifest.json")):
        raise ConfigError(f"data={cfg.data}: no manifest.json there; ingest it first with "
                          "`python pipelines/ingest.py output=...`")
    try:
        shards = ShardDataset.open(cfg.data)
        shards.check_bands(DEO_BANDS)
    except ValueError as e:
        raise ConfigError(f"data={cfg.data}: {e}") from e
    if not shards.files:
        raise ConfigError(f"data={cfg.data}: manifest.json lists no Parquet shards")
    counts = shards.manifest.get("counts", {})
    trainable = min(counts.get("ms", len(shards)), counts.get("sar", len(shards)) if cfg.model.sar else len(shards))
    if trainable < cfg.train.batch_size:  # at most that many rows the loop can use (manifest.json's counts)
        raise ConfigError(f"data={cfg.data} has {trainable} trainable rows (manifest.json counts; rows with "
                          f"{'ms and sar' if cfg.model.sar else 'ms'}), fewer than one global batch "
                          f"(train.batch_size={cfg.train.batch_size}): lower train.batch_size or ingest more")
    if cfg.train.cuda_graph and not cfg.scaling.use_gpu:  # else each worker fails in turn, after Ray's retries
        raise ConfigError("train.cuda_graph=true records the step as a CUDA graph: it needs scaling.use_gpu=true")
    if cfg.train.overlap_teachers and not cfg.scaling.use_gpu:
        print("warning: train.overlap_teachers=true runs the teachers on a second CUDA stream; the workers run "
              "on CPU (scaling.use_gpu=false), so it does nothing here", file=sys.stderr, flush=True)
    if cfg.teacher.weights and not storage.exists(cfg.teacher.weights):
        raise ConfigError(f"teacher.weights={cfg.teacher.weights}: file not found")
    if cfg.model.init_from and not storage.exists(cfg.model.init_from):
        raise ConfigError(f"model.init_from={cfg.model.init_from}: file not found")
    if cfg.probe.every and not storage.exists(cfg.probe.dataset):
        raise ConfigError(f"probe.dataset={cfg.probe.dataset!r}: not found (needed by probe.every)")
    return shards


def validate_shard_files(cfg: PretrainConfig) -> None:
    """Read every shard's footer before training starts (a damaged or foreign file is named here, not
    on each worker in turn). Raises ConfigError."""
    try:
        check_shard_files(ShardDataset.open(cfg.data).files, with_sar=cfg.model.sar)
    except ValueError as e:
        raise ConfigError(f"data={cfg.data}: {e}") from e


def check_weights(cfg: PretrainConfig) -> None:
    """Load each weights file of ``cfg`` into its model built on the meta device (shapes, no memory for
    the weights) with the workers' own loaders: a file that is no checkpoint, is cut short or holds another
    model fails here, naming its key, not on every worker after Ray's retries. Raises ConfigError."""
    import warnings

    import torch

    from deo.models.continual import init_from_backbone
    from deo.models.dinov3 import build_dinov3_vit, load_dinov3_weights
    from deo.models.student import build_student

    m, t, size = cfg.model, cfg.teacher, cfg.views.global_size
    loads = {
        "teacher.weights": (t.weights if cfg.loss.needs_teacher else "", lambda: load_dinov3_weights(build_dinov3_vit(t.name), t.weights)),
        "model.rgb_weights": (m.rgb_weights, lambda: build_student(m, img_size=size)),
        "model.init_from": (m.init_from, lambda: init_from_backbone(build_student(m, img_size=size), m.init_from,
                                                                    m.ms_embed_init)),
    }
    for key, (uri, load) in loads.items():
        if not uri:
            continue
        fs, path = storage.filesystem(uri)
        if fs.isdir(path):  # a run folder, as evaluate and export take: the loaders read files
            raise ConfigError(f"{key}={uri} is a folder; expected a weights file (for a deo run folder, its "
                              f"export: python pipelines/export.py checkpoint={uri})")
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*meta parameter.*no-op")  # nothing to copy: meta
                load()
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"{key}={uri}: {e}") from e


def resolve_teacher_layers(cfg: PretrainConfig) -> PretrainConfig:
    """``cfg`` with empty ``teacher.layers`` made the blocks they stand for, so the run's config.yaml
    names them."""
    import dataclasses

    if cfg.teacher.layers:
        return cfg
    from deo.models.dinov3 import default_layers, teacher_depth

    try:
        layers = default_layers(teacher_depth(cfg.teacher.name))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, layers=layers))


def finished_summary(run_uri: str, cfg: PretrainConfig) -> dict[str, Any] | None:
    """The summary of a run that already reached ``train.max_steps``, else None."""
    uri = storage.join(run_uri, "summary.json")
    if not storage.exists(uri):
        return None
    summary = json.loads(storage.read_text(uri))
    return summary if summary.get("steps", 0) >= cfg.train.max_steps else None


def check_resumable(run_uri: str, cfg: PretrainConfig) -> None:
    """Refuse to resume a run whose checkpoints hold another parameter layout (a head size, the student,
    a head switched off or on), naming the keys: the weights could not load on any worker.

    Raises:
        ConfigError: the run has a checkpoint and ``cfg`` changes its :func:`parameter_layout`.
    """
    from deo.train.checkpoint import latest_checkpoint
    from deo.train.task import parameter_layout

    uri = storage.join(run_uri, "config.yaml")
    if not storage.exists(uri) or latest_checkpoint(run_uri) is None:
        return
    try:
        saved = build_config(PretrainConfig, read_yaml(uri), source=uri)
    except ConfigError:
        return  # written by another deo version: the loop reports what does not load
    old, new = parameter_layout(saved), parameter_layout(cfg)
    changed = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in old if old[k] != new[k]]
    if changed:
        raise ConfigError(f"{run_uri} has checkpoints of another model, so it cannot resume under this config "
                          f"({'; '.join(changed)}): restore those values, or give another run.name")


def warn_if_config_changed(run_uri: str, cfg: PretrainConfig) -> None:
    """A finished run rerun under another config trains nothing: say so rather than ignore the change."""
    uri = storage.join(run_uri, "config.yaml")
    if not storage.exists(uri):
        return
    changes = config_changes(storage.read_text(uri), cfg)
    if changes:
        print(f"warning: {run_uri} already finished under another config, so nothing trains under this one "
              "(raise train.max_steps to train on, or choose another run.name):\n  " + "\n  ".join(changes),
              file=sys.stderr, flush=True)


def _init_ray(cfg: PretrainConfig) -> None:
    """Start or join Ray, then check that the cluster can ever hold the workers and that they can write
    the run folder."""
    from deo.cluster import check_cluster_storage, check_resources, start_or_join
    from deo.train.ray_glue import worker_resources

    start_or_join(cfg.scaling.address)
    s = cfg.scaling
    per_worker = worker_resources(s)
    per_key = {"CPU": "scaling.cpus_per_worker", "GPU": "scaling.gpus_per_worker (scaling.use_gpu=true)"}
    check_resources({k: v * s.num_workers for k, v in per_worker.items()},
                    {k: f"scaling.num_workers={s.num_workers} x {per_key.get(k, f'scaling.worker_resources.{k}')}"
                     for k in per_worker},
                    fix="fewer or smaller workers", per_unit=per_worker)
    check_cluster_storage({"run.storage": cfg.run.storage}, {"data": cfg.data})


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Validate, then train with Ray Train (resuming a run of the same name), and summarise."""
    ensure_default_data(cfg)
    validate(cfg)
    cfg = resolve_teacher_layers(absolute_paths(cfg))
    run_uri = run_folder(cfg)
    done = finished_summary(run_uri, cfg)
    if done is not None:
        warn_if_config_changed(run_uri, cfg)
        return PretrainResult(run_uri, done, resumed_finished=True)
    validate_shard_files(cfg)
    check_weights(cfg)
    check_resumable(run_uri, cfg)
    warn_if_job_scratch("run.storage", cfg.run.storage)
    _init_ray(cfg)
    from deo.train.ray_glue import build_trainer

    t0 = time.perf_counter()
    result = _fit_noting_ctrl_c(build_trainer(cfg, run_uri), run_uri)
    if result.error:
        raise result.error
    summary_uri = storage.join(run_uri, "summary.json")
    summary = json.loads(storage.read_text(summary_uri)) if storage.exists(summary_uri) else {}
    summary["wall_seconds"] = time.perf_counter() - t0
    return PretrainResult(run_uri, summary)


def _fit_noting_ctrl_c(trainer: Any, run_uri: str) -> Any:
    """``trainer.fit()``; Ctrl-C raises :class:`Interrupted` naming the checkpoint a rerun resumes from.

    Ray Train installs its own SIGINT handler inside ``fit``: it aborts the run and ends the driver with
    ``sys.exit`` (seen: ``SystemExit(1)``, a silent exit 1 to the user), so a KeyboardInterrupt or a
    SystemExit out of ``fit`` is the run's stop, not a result."""
    try:
        return trainer.fit()
    except (KeyboardInterrupt, SystemExit):
        from deo.train.checkpoint import latest_checkpoint

        newest = latest_checkpoint(run_uri)
        raise Interrupted(f"{run_uri} stopped by Ctrl-C; rerun the same command to resume it from "
                          f"{newest.rsplit('/', 1)[-1] if newest else 'its start (no checkpoint yet)'}") from None
