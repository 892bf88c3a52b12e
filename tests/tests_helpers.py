"""Small helpers shared by test modules (importable because tests/ is on sys.path via conftest)."""

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def metric_lines(run_folder: Path) -> list[dict]:
    """The records of a local run folder's metrics.jsonl."""
    text = (Path(run_folder) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
