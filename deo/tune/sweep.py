"""Ray Tune sweeps over full pretraining runs (same code path as ``pipelines/pretrain.py``).

Ray Train V2 takes no Trainer inside a Tuner, so each trial is a small function trainable that builds
the trial's TorchTrainer and forwards its reports to Tune (``TuneReportCallback``), as Ray's Train/Tune
interop docs describe. Each trial writes its own run folder ``<storage>/<name>/trials/<trial id>``;
ASHA stops weak trials early on the in-loop kNN probe, their checkpoints stay. Rerunning the same sweep
restores it: finished trials are not repeated, errored and unfinished ones continue.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, replace
from typing import Any

from ray import tune

from deo.cluster import (
    check_cluster_storage,
    check_resources,
    start_or_join,
    warn_if_job_scratch,
)
from deo.config import build_config, read_yaml, to_dict, to_yaml
from deo.io import storage
from deo.train.config import PretrainConfig
from deo.tune.config import SweepConfig
from deo.tune.space import overrides_from_params, to_tune_space


@dataclass
class SweepResult:
    """The sweep's table and where it was written."""

    sweep_uri: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    results_csv: str
    best_yaml: str
    plot: str
    interrupted: bool = False
    """Stopped by Ctrl-C (SIGINT): no best.yaml; a rerun resumes."""
    trials_total: int = 0
    """Trials the sweep runs in all (``num_samples`` x the grid); ``rows`` holds those started."""


class _TuneInterruptWatch:
    """Logging filter on Tune's logger: notes Tune's "Stop signal received" (Ctrl-C / SIGINT, or SIGUSR1,
    after which ``Tuner.fit`` returns the results as they stand, like a finished sweep), and drops its
    "Resume experiment with: Tuner.restore(...)": a sweep resumes by rerunning its command."""

    def __init__(self) -> None:
        self.interrupted = False

    def filter(self, record: Any) -> bool:
        message = record.getMessage()
        self.interrupted |= message.startswith("Stop signal received")
        return "Tuner.restore(" not in message


def _abs(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


def base_config(cfg: PretrainConfig) -> dict[str, Any]:
    """The trials' common pretraining config (base YAML <- sweep overrides) with local paths made
    absolute on the driver: Tune runs each trial in its own working directory."""
    from deo.train.driver import (
        absolute_paths,
        ensure_default_data,
        resolve_teacher_layers,
        validate,
        validate_shard_files,
    )

    ensure_default_data(cfg)  # the default sweep on a fresh clone: ingest the committed samples once
    validate(cfg)  # fail here, naming the key, rather than in every trial
    validate_shard_files(cfg)  # once, not per trial
    return to_dict(resolve_teacher_layers(absolute_paths(cfg)))


def trial_config(sweep: SweepConfig, base: dict[str, Any], params: dict[str, Any], trial_id: str
                 ) -> PretrainConfig:
    """The pretraining config of one trial: the common base <- sampled params <- its run folder
    (under ``sweep.storage``, which :func:`run_sweep` made absolute on the driver)."""
    r = sweep.resources
    overrides = [
        *overrides_from_params(params),
        f"run.storage={storage.join(sweep.storage, sweep.name, 'trials')}",
        f"run.name={trial_id}",
        f"scaling.num_workers={r.num_workers}",
        f"scaling.cpus_per_worker={r.cpus_per_worker}",
        f"scaling.use_gpu={r.use_gpu}",
    ]
    if not base.get("train", {}).get("compile_cache"):  # trials compile the same graphs: share the code
        overrides.append(f"train.compile_cache={storage.join(sweep.storage, sweep.name, 'compile_cache')}")
    return build_config(PretrainConfig, base, overrides, source=sweep.pretrain_config)


def check_trial_fits(sweep: SweepConfig, base: dict[str, Any]) -> None:
    """Fail fast when the cluster can never run one trial: its trainable and its TorchTrainer's workers.

    Raises:
        ConfigError: naming the ``resources.*`` key, as :func:`deo.cluster.check_resources` does.
    """
    from deo.train.ray_glue import worker_resources

    r = sweep.resources
    per_worker = worker_resources(trial_config(sweep, base, {}, "fit_check").scaling)
    needed = {k: v * r.num_workers for k, v in per_worker.items()}
    needed["CPU"] += r.trainable_cpus
    keys = {"CPU": f"resources.num_workers={r.num_workers} x resources.cpus_per_worker + resources.trainable_cpus",
            "GPU": f"resources.num_workers={r.num_workers} x scaling.gpus_per_worker (resources.use_gpu=true)"}
    check_resources(needed, {k: keys.get(k, f"scaling.worker_resources.{k} of pretrain_config") for k in needed},
                    fix="smaller trials", per_unit=per_worker)


def _trial(params: dict[str, Any], sweep_dict: dict[str, Any], base: dict[str, Any]) -> None:
    """The function trainable: one full pretraining run reporting to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from deo.train.driver import finished_summary, run_folder, validate
    from deo.train.ray_glue import build_trainer

    sweep = build_config(SweepConfig, sweep_dict)
    cfg = trial_config(sweep, base, params, tune.get_context().get_trial_id())
    validate(cfg)
    run_uri = run_folder(cfg)
    if finished_summary(run_uri, cfg) is not None:
        # finished before an interrupted sweep could record it: report its result, don't rerun it
        tune.report(final_metrics(run_uri))
        return
    result = build_trainer(cfg, run_uri, callbacks=[TuneReportCallback()]).fit()
    if result.error:
        raise result.error


def final_metrics(run_uri: str) -> dict[str, Any]:
    """The last logged losses and probe results of a finished run folder."""
    out: dict[str, Any] = {}
    for name in ("metrics.jsonl", "probe.jsonl"):
        uri = storage.join(run_uri, name)
        if storage.exists(uri):
            lines = [x for x in storage.read_text(uri).splitlines() if x.strip()]
            if lines:
                out.update(json.loads(lines[-1]))
    return out


def _scheduler(sweep: SweepConfig) -> Any:
    if sweep.scheduler == "fifo":
        return tune.schedulers.FIFOScheduler()
    return tune.schedulers.ASHAScheduler(
        time_attr="step", grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor,
        max_t=_max_steps(sweep, {}),
    )


def _searcher(sweep: SweepConfig) -> Any:
    if sweep.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:
            raise ValueError("search=optuna needs `pip install optuna`") from e
        return tune.search.ConcurrencyLimiter(OptunaSearch(seed=sweep.seed), sweep.max_concurrent)
    return None


def run_sweep(sweep: SweepConfig) -> SweepResult:
    """Run (or resume) the sweep and write results.csv, best.yaml and metric curves."""
    # a misspelt key in overrides, pretrain_config or space fails before a local Ray starts
    pretrain = build_config(PretrainConfig, read_yaml(sweep.pretrain_config), sweep.overrides,
                            source=sweep.pretrain_config)
    space = to_tune_space(sweep.space)
    start_or_join()
    warn_if_job_scratch("storage", sweep.storage)
    # resolved here, on the driver: the trials run in working directories of Ray's own
    sweep = replace(sweep, storage=_abs(sweep.storage))
    base = base_config(pretrain)  # validates the data once, on the driver
    check_trial_fits(sweep, base)
    check_cluster_storage({"storage": sweep.storage}, {"data": pretrain.data})
    storage_root = sweep.storage
    sweep_uri = storage.join(storage_root, sweep.name)
    r = sweep.resources
    trainable = tune.with_resources(
        tune.with_parameters(_trial, sweep_dict=to_dict(sweep), base=base),
        {"CPU": r.trainable_cpus},
    )
    if tune.Tuner.can_restore(sweep_uri):
        print(f"resuming sweep {sweep_uri}", flush=True)
        tuner = tune.Tuner.restore(sweep_uri, trainable, resume_errored=True, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                max_concurrent_trials=sweep.max_concurrent, scheduler=_scheduler(sweep),
                search_alg=_searcher(sweep),
            ),
            run_config=tune.RunConfig(
                name=sweep.name, storage_path=storage_root,
                failure_config=tune.FailureConfig(max_failures=r.max_failures),
            ),
        )
    import logging

    watch = _TuneInterruptWatch()
    logging.getLogger("ray.tune.tune").addFilter(watch)
    try:
        grid = tuner.fit()
    finally:
        logging.getLogger("ray.tune.tune").removeFilter(watch)
    return write_results(sweep, grid, sweep_uri, interrupted=watch.interrupted)


def write_results(sweep: SweepConfig, grid: Any, sweep_uri: str, interrupted: bool = False) -> SweepResult:
    """results.csv (params, metric, steps, status, error), best.yaml and a PNG of metric curves.

    ``interrupted``: Ctrl-C stopped the sweep. Trials below ``train.max_steps`` are then UNFINISHED (cut
    by the interrupt, or stopped by ASHA before it: the rerun tells), and no best.yaml is written.
    """
    rows: list[dict[str, Any]] = []
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for res in grid:
        trial_id = _trial_id(res)
        df = res.metrics_dataframe
        steps, values = [], []
        if df is not None and sweep.metric in df and "step" in df:
            sub = df[["step", sweep.metric]].dropna()
            steps, values = sub["step"].astype(int).tolist(), sub[sweep.metric].astype(float).tolist()
        params = {k: v for k, v in (res.config or {}).items()}
        metrics = res.metrics or {}
        status = ("ERROR" if res.error else "TERMINATED" if metrics.get("step", 0) >= _max_steps(sweep, params)
                  else "UNFINISHED" if interrupted else "STOPPED")
        best_value = (max(values) if sweep.mode == "max" else min(values)) if values else None
        row = {"trial": trial_id, **params, sweep.metric: best_value,
               "last_" + sweep.metric: values[-1] if values else None,
               "steps": metrics.get("step", steps[-1] if steps else 0), "status": status,
               "error": _error_line(res.error)}
        rows.append(row)
        curves[trial_id] = (steps, values)
    rows.sort(key=lambda r: r["trial"])  # Tune's order varies between a run and its resume
    scored = [r for r in rows if r[sweep.metric] is not None]
    best = None
    if scored:
        # ties (a small probe set gives few distinct values) go to the trial that trained longest, then to
        # the first trial id (max keeps the first of equals): a rerun names the same best trial
        sign = 1 if sweep.mode == "max" else -1
        best = max(scored, key=lambda r: (sign * r[sweep.metric], r["steps"] or 0))
    results_csv = storage.join(sweep_uri, "results.csv")
    buf = io.StringIO()
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "trial", k))
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    storage.write_text(results_csv, buf.getvalue())
    best_yaml = storage.join(sweep_uri, "best.yaml")
    if best is not None and not interrupted:  # a best of part of the sweep would be taken for the answer
        params = {k: best[k] for k in sweep.space}
        # its own run name: as --config it must not resume into (or find finished) the base config's run
        base = read_yaml(sweep.pretrain_config)
        cfg = build_config(PretrainConfig, base,
                           [*sweep.overrides, *overrides_from_params(params), f"run.name={sweep.name}-best"])
        full_steps = build_config(PretrainConfig, base).train.max_steps  # the length without the sweep's cut
        storage.write_text(best_yaml, f"# best trial {best['trial']}: {sweep.metric}={best[sweep.metric]}\n"
                                      "# its config, the sweep's overrides included; a full run from it:\n"
                                      "#   python pipelines/pretrain.py --config best.yaml "
                                      f"train.max_steps={full_steps} run.export=true\n" + to_yaml(cfg))
    plot = storage.join(sweep_uri, "curves.png")
    storage.write_bytes(plot, _plot(curves, sweep.metric))
    storage.write_text(storage.join(sweep_uri, "summary.json"),
                       json.dumps({"rows": rows, "best": best}, indent=1, default=str))
    total = sweep.num_samples * math.prod(len(d["values"]) for d in sweep.space.values() if d.get("type") == "grid")
    return SweepResult(sweep_uri, rows, best, results_csv, best_yaml, plot, interrupted, total)


def _error_line(error: BaseException | None) -> str:
    """The informative last line of a (Ray-wrapped) trial error."""
    if error is None:
        return ""
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def _trial_id(res: Any) -> str:
    """The Tune trial id (which names the trial's run folder ``trials/<id>``)."""
    tid = (res.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    # errored before any report: Tune's trial folder is "<trainable>_<experiment>_<index>_<params>..."
    name = os.path.basename((res.path or "").rstrip("/")).removeprefix("_trial_")
    parts = name.split("_")
    return "_".join(parts[:2]) if len(parts) >= 2 else name


def _max_steps(sweep: SweepConfig, params: dict[str, Any]) -> int:
    cfg = build_config(PretrainConfig, read_yaml(sweep.pretrain_config),
                       [*sweep.overrides, *overrides_from_params(params)])
    return cfg.train.max_steps


def _plot(curves: dict[str, tuple[list[int], list[float]]], metric: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for trial, (steps, values) in sorted(curves.items()):
        if steps:
            ax.plot(steps, values, marker="o", label=trial)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title("sweep trials")
    if curves:
        ax.legend(fontsize=6)
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    """A plain-text results table."""
    if not rows:
        return "(no trials)"
    keys = [k for k in rows[0] if k not in ("error",)]
    widths = {k: max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys)]
    for r in sorted(rows, key=lambda r: (r.get(metric) is None, -(r.get(metric) or 0))):
        lines.append("  ".join(_fmt(r.get(k)).ljust(widths[k]) for k in keys))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
