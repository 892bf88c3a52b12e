"""Per-iteration schedules (lr, weight decay, EMA momentum), rebuilt from config on resume.

Each schedule is a numpy array indexed by the optimizer step, as dinov2/dinov3 do, so a resumed run
continues exactly where it stopped instead of restarting its schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deo.train.config import TrainConfig


def cosine_schedule(start: float, end: float, steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warmup from ``warmup_start`` to ``start``, then half-cosine from ``start`` to ``end``.

    Returns:
        (steps,) float64 array; value at step i is used for optimizer step i.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    warmup_steps = min(max(warmup_steps, 0), steps)
    warmup = np.linspace(warmup_start, start, warmup_steps, endpoint=False)
    n = steps - warmup_steps
    t = np.arange(n) / max(n - 1, 1)
    cosine = end + 0.5 * (start - end) * (1 + np.cos(np.pi * t))
    return np.concatenate([warmup, cosine])


@dataclass(frozen=True)
class Schedules:
    """lr, weight decay and EMA momentum for every optimizer step."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray

    @classmethod
    def from_config(cls, train: TrainConfig) -> Schedules:
        """Build all three schedules for ``train.max_steps`` steps."""
        steps = train.max_steps
        return cls(
            lr=cosine_schedule(train.peak_lr, train.min_lr, steps, train.warmup_steps),
            weight_decay=cosine_schedule(train.weight_decay, train.weight_decay_end, steps),
            momentum=cosine_schedule(train.ema_momentum, train.ema_momentum_end, steps),
        )

    def at(self, step: int) -> tuple[float, float, float]:
        """(lr, weight_decay, momentum) at ``step`` (clamped to the last step)."""
        i = min(step, len(self.lr) - 1)
        return float(self.lr[i]), float(self.weight_decay[i]), float(self.momentum[i])
