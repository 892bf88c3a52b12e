"""Per-band running statistics over valid pixels, mergeable across workers (for normalisation)."""

from __future__ import annotations

from typing import Any

import numpy as np


class BandStats:
    """Sum, sum of squares and count per band, in float64 so millions of pixels stay exact enough."""

    def __init__(self, bands: int) -> None:
        self.sum = np.zeros(bands, dtype=np.float64)
        self.sumsq = np.zeros(bands, dtype=np.float64)
        self.count = np.zeros(bands, dtype=np.int64)

    def update(self, x: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add pixels of ``x`` (C, H, W) where ``valid`` (H, W) is True (all pixels when None)."""
        v = x.reshape(x.shape[0], -1).astype(np.float64)
        if valid is not None:
            v = v[:, valid.reshape(-1)]
        self.sum += v.sum(axis=1)
        self.sumsq += np.square(v).sum(axis=1)
        self.count += v.shape[1]

    def merge(self, other: BandStats) -> None:
        """Add another accumulator's pixels."""
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.count += other.count

    def to_state(self) -> dict[str, list[float]]:
        """A JSON-able state (for job summaries)."""
        return {"sum": self.sum.tolist(), "sumsq": self.sumsq.tolist(), "count": self.count.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> BandStats:
        """Rebuild from :meth:`to_state`."""
        out = cls(len(state["sum"]))
        out.sum[:] = state["sum"]
        out.sumsq[:] = state["sumsq"]
        out.count[:] = state["count"]
        return out

    def mean_std(self) -> dict[str, list[float]]:
        """{"mean": [...], "std": [...]} per band (population std; NaN for bands without pixels)."""
        n = np.maximum(self.count, 1)
        mean = self.sum / n
        var = np.maximum(self.sumsq / n - mean**2, 0.0)
        empty = self.count == 0
        mean[empty] = np.nan
        var[empty] = np.nan
        return {"mean": [float(m) for m in mean], "std": [float(s) for s in np.sqrt(var)]}
