"""Ingest Sentinel-2 and aerial imagery into Parquet shards + manifest.json (DESIGN.md shard contract).

    python pipelines/ingest.py                                  # the committed samples -> runs/shards/samples
    python pipelines/ingest.py s2=[s3://bucket/S2/] aerial=[] output=s3://bucket/shards strict=true

Exits 1 when nothing was ingested, or when strict=true and an input failed; 2 on a bad config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deo.config import ConfigError, fail, load_config  # noqa: E402
from deo.ingest.config import IngestConfig  # noqa: E402
from deo.ingest.run import failure_lines, ingest  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ingest" / "default.yaml"


def main(argv: list[str]) -> int:
    """Parse the config, run the ingest, print the summary; returns the exit code."""
    try:
        cfg = load_config(IngestConfig, argv, DEFAULT_CONFIG, title="python pipelines/ingest.py: "
                          "Sentinel-2 + aerial imagery -> Parquet shards")
        summary = ingest(cfg)
    except ConfigError as e:  # also storage that refuses access (deo.io.storage.StorageAccessError)
        fail(str(e))
    c = summary["counts"]
    print(f"[ingest] done in {summary['seconds']:.1f} s: {c['rows']} tiles ({c['ms']} MS, "
          f"{c['optical']} optical, {c['paired']} aerial pairs, {c['sar']} with SAR), rejected {c['rejected']} "
          f"(nodata {c['rejected_nodata']}, cloud {c['rejected_cloud']}), {summary['tiles_per_s']} tiles/s")
    print(f"[ingest] sources ok {summary['sources']['ok']}, partial {summary['sources']['partial']}, "
          f"skipped {summary['sources']['skipped']}, failed {summary['sources']['failed']}; "
          f"manifest {summary['manifest']}")
    for line in failure_lines(summary["failed"]):
        print(f"[ingest] {line}", file=sys.stderr)
    print(json.dumps({"summary_json": cfg.summary or summary["output"] + "/summary.json"}))
    if c["rows"] == 0:
        print("error: nothing was ingested (see the failed and skipped sources above and in the manifest)",
              file=sys.stderr)
        return 1
    if cfg.strict and summary["failed"]:
        print(f"error: strict=true and {len(summary['failed'])} inputs failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
