"""Evaluate a pretrained backbone: kNN, linear and few-shot probes on frozen features, and pca.png.

    python pipelines/evaluate.py checkpoint=runs/default dataset=PATH [out=DIR] [baselines=[random,pixels,teacher]]
    python pipelines/evaluate.py checkpoint=URI train_set=PATH test_set=PATH s2_band_order=eurosat

`checkpoint` is a run folder (latest checkpoint), a checkpoint_* folder or a .safetensors export.
Writes <out>/report.json (every number, dataset, checkpoint hash, config) and <out>/pca.png, and prints
a table. `--help` lists every key.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deo.cluster import warn_if_job_scratch  # noqa: E402
from deo.config import ConfigError, fail, load_config  # noqa: E402
from deo.eval.config import EvalConfig  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "eval" / "default.yaml"


def main(argv: list[str]) -> int:
    try:
        cfg = load_config(EvalConfig, argv, DEFAULT_CONFIG, title=__doc__.strip().splitlines()[0])
        from deo.eval.evaluate import evaluate

        warn_if_job_scratch("out" if cfg.out else "checkpoint", cfg.out or cfg.checkpoint)  # where it writes
        report = evaluate(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    from deo.eval.report import format_table

    c = report["checkpoint"]
    print(f"\n=== evaluation of {c['resolved']} (step {c['step']}, weights sha256 {c['weights_sha256'][:16]}) ===")
    print(format_table(report))
    print(f"report       {report['report_json']}")
    if report["pca_png"]:
        print(f"pca          {report['pca_png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
