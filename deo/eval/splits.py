"""Seeded index splits for probes: stratified train/test and n-per-class few-shot draws."""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices so every class keeps about ``test_fraction`` of its samples in the test part.

    Each class with at least two samples puts round(n * test_fraction) of them (at least one, at
    most n - 1) into the test part. Multi-label sets (2-D ``labels``) are split at random.

    Args:
        labels: (N,) class indices, or (N, C) multi-hot.
        test_fraction: in (0, 1).
        seed: numpy seed; the same seed gives the same split.

    Returns:
        (train indices, test indices), each sorted.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    if labels.ndim == 2:
        perm = rng.permutation(n)
        n_test = min(max(1, round(n * test_fraction)), n - 1)
        return np.sort(perm[n_test:]), np.sort(perm[:n_test])
    test: list[int] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        if len(idx) < 2:
            continue
        n_test = min(max(1, round(len(idx) * test_fraction)), len(idx) - 1)
        test.extend(idx[:n_test].tolist())
    test_idx = np.sort(np.array(test, dtype=np.int64))
    train_idx = np.setdiff1d(np.arange(n), test_idx)
    return train_idx, test_idx


def sample_per_class(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` random indices per class (all of a class that has fewer), sorted.

    Args:
        labels: (N,) class indices.
        shots: samples per class, >= 1.
        seed: numpy seed.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    if labels.ndim != 1:
        raise ValueError(f"few-shot draws need single-label (N,) labels, got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.nonzero(labels == c)[0])[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))
