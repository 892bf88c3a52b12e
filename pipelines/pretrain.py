"""Pretrain a DEO backbone with Ray Train.

    python pipelines/pretrain.py [--config configs/pretrain/default.yaml] [key=value ...]
    ray job submit --working-dir . -- python pipelines/pretrain.py data=s3://... run.storage=s3://... run.name=x

With no arguments: a local Ray, the committed samples (ingested first if needed), a tiny student and
teacher, a few hundred steps on CPU. Rerunning the same run.name resumes it; a finished run prints its
summary. `--help` lists every key.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deo.config import ConfigError, fail, load_config  # noqa: E402
from deo.train.config import PretrainConfig  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "default.yaml"


def main(argv: list[str]) -> int:
    try:
        cfg = load_config(PretrainConfig, argv, DEFAULT_CONFIG, title=__doc__.strip().splitlines()[0])
    except ConfigError as e:
        fail(str(e))
    # torch and Ray: imported after --help and config errors
    from deo.train.driver import Interrupted, pretrain

    try:
        result = pretrain(cfg)
    except ConfigError as e:
        fail(str(e))
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr, flush=True)
        return 130  # as a shell reports a command ended by Ctrl-C
    s = result.summary
    if result.resumed_finished:
        print(f"run {result.run_uri} already finished at step {s.get('steps')}; nothing to do")
    losses = s.get("final_losses", {})
    print("\n=== pretraining summary ===")
    print(f"run folder   {result.run_uri}")
    print(f"steps        {s.get('start_step', 0)} -> {s.get('steps')}")
    print("losses       " + "  ".join(f"{k}={v:.4f}" for k, v in losses.items()))
    print(f"images/s     {s.get('images_per_s', 0):.1f}   data-wait {100 * s.get('data_wait', 0):.1f}%")
    if s.get("backbone"):
        print(f"backbone     {s['backbone']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
