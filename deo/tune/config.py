"""Typed config of ``pipelines/sweep.py``: what to sweep, how to schedule and search, where to write."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deo.config import nested, option

SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("random", "optuna")
SPACE_TYPES = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass
class TrialResources:
    """Resources of each trial (the TorchTrainer inside asks for its own workers)."""

    num_workers: int = option(1, help="training workers per trial")
    cpus_per_worker: float = option(0.5, help="CPUs per training worker")
    use_gpu: bool = option(False, help="train each trial on GPUs")
    trainable_cpus: float = option(
        0.01, help="CPUs of the function trainable that drives the trial's TorchTrainer (> 0; it only waits)"
    )
    max_failures: int = option(1, help="retries of a failed trial before it is recorded as ERROR")


@dataclass
class SweepConfig:
    """pipelines/sweep.py: Ray Tune sweep of DEO loss weights over full pretraining runs."""

    storage: str = option("runs/sweeps", help="folder or URI holding sweeps")
    name: str = option("alpha_gamma", help="sweep name; rerunning the same name resumes the sweep")
    pretrain_config: str = option("configs/pretrain/default.yaml", help="base pretraining config of every trial")
    overrides: list[str] = option([], help="key=value overrides applied to every trial's pretrain config")
    space: dict[str, Any] = option(
        {}, help="search space: {key: {type: grid|choice|uniform|loguniform|randint, values|low/high}}"
    )
    num_samples: int = option(4, help="trials (for grid: repeats of the whole grid)")
    max_concurrent: int = option(2, help="trials running at once")
    scheduler: str = option("asha", help="asha (early stopping on the metric) or fifo (run all to the end)")
    search: str = option("random", help="random, or optuna (when installed)")
    metric: str = option("probe/knn_avg", help="metric reported by the trials (in-loop kNN probe)")
    mode: str = option("max", help="max or min")
    grace_period: int = option(1, help="ASHA: training steps before a trial may be stopped (rungs are counted in steps)")
    reduction_factor: int = option(2, help="ASHA: keep the best 1/reduction_factor at each rung")
    seed: int = option(0, help="seed of the search")
    resources: TrialResources = nested(TrialResources)

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.search not in SEARCHERS:
            raise ValueError(f"search must be one of {SEARCHERS}, got {self.search!r}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode must be max or min, got {self.mode!r}")
        if self.resources.trainable_cpus <= 0:
            raise ValueError(f"resources.trainable_cpus must be > 0, got {self.resources.trainable_cpus}")
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise ValueError("num_samples and max_concurrent must be >= 1")
        for key, spec in self.space.items():
            if not isinstance(spec, dict) or spec.get("type") not in SPACE_TYPES:
                split = isinstance(spec, dict) and "type" not in spec and all(isinstance(v, dict) for v in spec.values())
                hint = ("; space keys are whole pretrain keys such as loss.alpha1, so a command-line "
                        f"space.{key}.<...>=value splits one at its dots: edit the sweep YAML, or give the whole "
                        "space, e.g. space={loss.alpha1: {type: uniform, low: 0.25, high: 1.0}}") if split else ""
                raise ValueError(f"space.{key}: expected a mapping with type in {SPACE_TYPES}, got {spec!r}{hint}")
