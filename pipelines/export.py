"""Export a run's student as backbone.safetensors (weights + bands, GSD, stats, config metadata).

    python pipelines/export.py checkpoint=runs/default [out=PATH_OR_URI]

Writes the export and a summary JSON beside it (backbone.summary.json). Load it with
`deo.load_backbone(path, bands=[...])`. `--help` lists every key.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deo.cluster import warn_if_job_scratch  # noqa: E402
from deo.config import ConfigError, fail, load_config  # noqa: E402
from deo.eval.config import ExportConfig  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "export" / "default.yaml"


def main(argv: list[str]) -> int:
    try:
        cfg = load_config(ExportConfig, argv, DEFAULT_CONFIG, title=__doc__.strip().splitlines()[0])
        from deo.export import export_checkpoint, write_summary

        warn_if_job_scratch("out" if cfg.out else "checkpoint", cfg.out or cfg.checkpoint)  # where it writes
        out, header = export_checkpoint(cfg.checkpoint, cfg.out)
        summary = write_summary(out, header, cfg.summary)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    bands = json.loads(header["bands"])
    print(f"exported     {out}")
    print(f"from         {header['source']} (step {header['step']})")
    print(f"weights      sha256 {header['weights_sha256']}")
    print("bands        " + "; ".join(f"{m}: {','.join(b)}" for m, b in bands.items()))
    print(f"summary      {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
