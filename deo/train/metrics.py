"""Training metrics: metrics.jsonl (rewritten whole, resumable), progress lines, TensorBoard.

Object stores cannot append, so rank 0 keeps the run's metric lines in memory and rewrites
``metrics.jsonl`` at each checkpoint. On resume, lines after the checkpoint's step are dropped, so a
stopped and resumed run has each step exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

from deo.io import storage


class MetricsLog:
    """Rank 0's record of logged steps for one run folder."""

    def __init__(self, run_uri: str, resume_step: int, tensorboard: bool = True,
                 mlflow_uri: str = "") -> None:
        self.run_uri = run_uri
        self.uri = storage.join(run_uri, "metrics.jsonl")
        self.probe_uri = storage.join(run_uri, "probe.jsonl")
        self.lines = self._read(self.uri, resume_step)
        self.probe_lines = self._read(self.probe_uri, resume_step)
        self.tb_dir = tempfile.mkdtemp(prefix="deo-tb-") if tensorboard else None
        self.writer = None
        if self.tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.tb_dir, purge_step=resume_step + 1 if resume_step else None)
        self.mlflow = None
        if mlflow_uri:
            import mlflow  # optional dependency, only when configured

            mlflow.set_tracking_uri(mlflow_uri)
            mlflow.start_run(run_name=run_uri.rstrip("/").rsplit("/", 1)[-1])
            self.mlflow = mlflow

    @staticmethod
    def _read(uri: str, resume_step: int) -> list[dict[str, Any]]:
        """Records of an existing file up to ``resume_step`` (later ones were never checkpointed)."""
        if resume_step <= 0 or not storage.exists(uri):
            return []
        records = [json.loads(x) for x in storage.read_text(uri).splitlines() if x.strip()]
        return [r for r in records if r["step"] <= resume_step]

    def log_probe(self, record: dict[str, Any]) -> None:
        """Add one in-loop probe result (``step`` and ``probe/*`` values) to probe.jsonl."""
        self.probe_lines.append(record)
        if self.writer is not None:
            for k, v in record.items():
                if k != "step":
                    self.writer.add_scalar(k, v, int(record["step"]))

    def log(self, record: dict[str, Any]) -> None:
        """Add one step's record (must contain ``step``)."""
        self.lines.append(record)
        step = int(record["step"])
        if self.writer is not None:
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, int | float):
                    self.writer.add_scalar(k, v, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: float(v) for k, v in record.items()
                                     if isinstance(v, int | float) and k != "step"}, step=step)

    def flush(self) -> None:
        """Rewrite metrics.jsonl and copy TensorBoard event files into the run folder."""
        storage.write_text(self.uri, "".join(json.dumps(r) + "\n" for r in self.lines))
        if self.probe_lines:
            storage.write_text(self.probe_uri, "".join(json.dumps(r) + "\n" for r in self.probe_lines))
        if self.writer is not None and self.tb_dir:
            self.writer.flush()
            for name in os.listdir(self.tb_dir):
                with open(os.path.join(self.tb_dir, name), "rb") as f:
                    storage.write_bytes(storage.join(self.run_uri, "tensorboard", name), f.read())

    def close(self) -> None:
        """Flush and release the writers."""
        self.flush()
        self.discard(status="FINISHED")

    def discard(self, status: str = "FAILED") -> None:
        """Release the writers and the temporary TensorBoard folder without writing (a failed attempt:
        its resume keeps what the last checkpoint flushed). Safe to call again."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.tb_dir:
            shutil.rmtree(self.tb_dir, ignore_errors=True)
            self.tb_dir = None
        if self.mlflow is not None:
            self.mlflow.end_run(status=status)
            self.mlflow = None


def progress_line(step: int, max_steps: int, losses: dict[str, float], lr: float,
                  images_per_s: float, data_wait: float, started: float, start_step: int) -> str:
    """``step 120/300 | loss -1.234 compression 0.5 ... | lr 4.1e-04 | 85.2 img/s | wait 1% | ETA 2m05s``."""
    done = step - start_step
    elapsed = time.perf_counter() - started
    eta = elapsed / max(done, 1) * (max_steps - step)
    terms = " ".join(f"{k} {v:.4g}" for k, v in losses.items())
    return (f"step {step}/{max_steps} | {terms} | lr {lr:.2e} | {images_per_s:.1f} img/s | "
            f"wait {100 * data_wait:.1f}% | ETA {int(eta // 60)}m{int(eta % 60):02d}s")
