"""report.json and the printed results table of ``pipelines/evaluate.py``."""

from __future__ import annotations

import json
from typing import Any

from deo.io import storage

REPORT_VERSION = 1


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def format_table(report: dict[str, Any]) -> str:
    """One row per (method, branch): kNN average, linear probe and few-shot numbers, in percent."""
    multi = report["dataset"]["multi_label"]
    shots = [str(n) for n in report["config"]["few_shot"]] if not multi else []
    if multi:
        head = ["method/branch", "kNN mAP avg", "linear mAP", "micro-F1", "macro-F1"]
    else:
        head = ["method/branch", "kNN avg", "linear top1", "linear F1", *[f"{n}-shot" for n in shots]]
    rows = []
    for name, r in report["results"].items():
        lin = r["linear"]
        if multi:
            rows.append([name, _pct(r["knn"]["knn_avg"]), _pct(lin["map"]), _pct(lin["micro_f1"]), _pct(lin["macro_f1"])])
        else:
            few = r.get("few_shot") or {}
            rows.append([name, _pct(r["knn"]["knn_avg"]), _pct(lin["top1"]), _pct(lin["macro_f1"]),
                         *[_pct(few.get(n, {}).get("top1")) for n in shots]])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in [head, *rows]]
    ks = next(iter(report["results"].values()))["knn"]["ks"] if report["results"] else []
    d = report["dataset"]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"kNN k used: {ks} (average = knn_avg); train {d['n_train']}, test {d['n_test']}, "
                 f"{len(d['classes'])} classes; numbers in %")
    skipped = {n: f["skipped"] for r in report["results"].values()
               for n, f in (r.get("few_shot") or {}).items() if "skipped" in f}
    if skipped:
        lines.append(f"few-shot {', '.join(f'{n}-shot' for n in skipped)} not run: {next(iter(skipped.values()))}")
    return "\n".join(lines)


def write_report(out: str, report: dict[str, Any]) -> str:
    """Write ``<out>/report.json`` and return its URI."""
    uri = storage.join(out, "report.json")
    storage.write_text(uri, json.dumps(report, indent=1, sort_keys=False, default=str) + "\n")
    return uri
