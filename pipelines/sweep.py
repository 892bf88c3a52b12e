"""Sweep DEO loss weights with Ray Tune over full pretraining runs.

    python pipelines/sweep.py --config configs/sweep/alpha_gamma.yaml [key=value ...]

Rerunning the same command resumes an interrupted sweep. Writes <storage>/<name>/results.csv,
best.yaml (the best trial's pretrain config, run.name <name>-best; ties go to the longest-trained,
then the first trial) and curves.png. results.csv's status: TERMINATED (trained to train.max_steps),
STOPPED (stopped early by ASHA; Tune's own table calls these TERMINATED too), ERROR (with its error
line) or UNFINISHED (below train.max_steps when Ctrl-C stopped the sweep: it then writes no best.yaml
and exits 130; rerun to resume). `--help` lists every key.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deo.config import ConfigError, fail, load_config  # noqa: E402
from deo.tune.config import SweepConfig  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sweep" / "alpha_gamma.yaml"


def main(argv: list[str]) -> int:
    try:
        cfg = load_config(SweepConfig, argv, DEFAULT_CONFIG, title=__doc__.strip().splitlines()[0])
        from deo.tune.sweep import format_table, run_sweep

        result = run_sweep(cfg)
    except ConfigError as e:
        fail(str(e))
    if result.interrupted:
        done = sum(r["status"] in ("TERMINATED", "ERROR") for r in result.rows)
        print(f"\n=== sweep interrupted: {done} of {result.trials_total} trials done ===")
        print(format_table(result.rows, cfg.metric))
        print(f"\nresults so far  {result.results_csv} (no best.yaml until the sweep ends)\n"
              "rerun the same command to resume the sweep", flush=True)
        return 130  # as a shell reports a command ended by Ctrl-C
    print("\n=== sweep results ===")
    print(format_table(result.rows, cfg.metric))
    print(f"\nresults  {result.results_csv}\nbest     {result.best_yaml}\ncurves   {result.plot}")
    errors = [r for r in result.rows if r["status"] == "ERROR"]
    if errors:
        print(f"{len(errors)} trial(s) failed: " + "; ".join(f"{r['trial']}: {r['error']}" for r in errors))
    return 0 if result.best is not None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
