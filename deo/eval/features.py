"""Batched frozen-feature extraction with progress, and the raw-pixel baseline features."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
from torch import nn


def normalise(x: torch.Tensor, stats: dict[str, list[float]]) -> torch.Tensor:
    """(x - mean) / std per channel.

    Args:
        x: (N, C, H, W) in stored units.
        stats: ``{"mean": [C], "std": [C]}``.

    Raises:
        ValueError: the stats do not have C entries.
    """
    mean = torch.as_tensor(stats["mean"], dtype=torch.float32, device=x.device)
    std = torch.as_tensor(stats["std"], dtype=torch.float32, device=x.device)
    if mean.numel() != x.shape[1] or std.numel() != x.shape[1]:
        raise ValueError(
            f"normalisation stats have {mean.numel()} means / {std.numel()} stds for {x.shape[1]} channels"
        )
    return (x.float() - mean[None, :, None, None]) / std[None, :, None, None]


class Progress:
    """Prints ``label: done/total (rate/s)`` to stderr at most every ``every`` seconds and at the end."""

    def __init__(self, label: str, every: float = 5.0, quiet: bool = False) -> None:
        """Start the clock for ``label``."""
        self.label, self.every, self.quiet = label, every, quiet
        self.start = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        """Report ``done`` of ``total``."""
        now = time.monotonic()
        if self.quiet or (done < total and now - self.last < self.every):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        print(f"{self.label}: {done}/{total} ({rate:.1f}/s)", file=sys.stderr, flush=True)


@torch.no_grad()
def extract_features(
    fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Apply ``fn`` to ``images`` batch by batch on ``device``.

    Args:
        fn: batch (B, C, H, W) on ``device`` -> features (B, ...).
        images: (N, C, H, W) on any device (moved batch by batch).
        batch_size: samples per batch.
        device: compute device.
        progress: called as ``progress(done, total)`` after each batch.

    Returns:
        (N, ...) float32 features on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for start in range(0, images.shape[0], batch_size):
        out.append(fn(images[start : start + batch_size].to(device)).float().cpu())
        if progress:
            progress(min(start + batch_size, images.shape[0]), images.shape[0])
    return torch.cat(out)


def student_features(
    student: nn.Module,
    images: torch.Tensor,
    modality: str,
    stats: dict[str, list[float]],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    patches: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Frozen student features of un-normalised images.

    The student is put in eval mode for the extraction and returned to its previous mode.

    Args:
        student: a ``DEOStudent`` (``forward_features(x, modality)`` -> (B, h, w, D)).
        images: (N, C, H, W) stored units.
        modality: ``ms``, ``optical`` or ``sar``.
        stats: the modality's ``{"mean", "std"}``.
        patches: return final-stage tokens (N, h, w, D) instead of their mean (N, D).

    Returns:
        (N, D) pooled or (N, h, w, D) patch features, float32 on the CPU.
    """
    was_training = student.training
    student.eval()
    try:
        def fn(x: torch.Tensor) -> torch.Tensor:
            tokens = student.forward_features(normalise(x, stats), modality)
            return tokens if patches else tokens.mean(dim=(1, 2))

        return extract_features(fn, images, batch_size, device, progress)
    finally:
        student.train(was_training)


def pixel_features(images: torch.Tensor, stats: dict[str, list[float]] | None = None) -> torch.Tensor:
    """Raw-pixel baseline: per-band mean and std of each (normalised) image.

    Args:
        images: (N, C, H, W) stored units.
        stats: normalise first with these (so bands weigh alike under cosine similarity).

    Returns:
        (N, 2C) float32: C means then C standard deviations.
    """
    x = normalise(images, stats) if stats else images.float()
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3), unbiased=False)], dim=1)
