"""Linear probes on frozen features: L2-regularised logistic regression fitted with L-BFGS.

Features are standardised with the training mean and std. The objective is that of scikit-learn's
``LogisticRegression(C=1 / (l2 * N))`` (multinomial softmax for single-label sets, one independent
sigmoid per class for multi-label sets); the bias is not penalised::

    L(W, b) = mean_n CE(softmax(W x_n + b), y_n) + l2 / 2 * ||W||^2       (single-label)
    L(W, b) = sum_c mean_n BCE(sigmoid(w_c x_n + b_c), y_nc) + l2 / 2 * ||W||^2   (multi-label)

The fit is convex and starts from zeros, so it is deterministic; seeds only choose the validation
split that picks ``l2`` and the few-shot draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deo.eval.metrics import macro_f1, mean_average_precision, multilabel_f1, top1
from deo.eval.splits import sample_per_class, stratified_split

L2_GRID: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""Candidate l2 strengths, chosen on a held-out part of the training features."""

FEW_SHOTS: tuple[int, ...] = (1, 5, 10)


@dataclass
class LogisticModel:
    """A fitted probe. Shapes: weight (C, D), bias (C,), mean and std (D,)."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    multi_label: bool

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) features -> (N, C) logits (float64)."""
        z = (x.double() - self.mean) / self.std
        return z @ self.weight.T + self.bias

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) features -> (N, C) probabilities (softmax, or sigmoid per class if multi-label)."""
        z = self.logits(x)
        return z.sigmoid() if self.multi_label else z.softmax(1)


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = 300
) -> LogisticModel:
    """Fit the probe by full-batch L-BFGS in float64.

    Args:
        x: (N, D) training features.
        y: (N,) class indices, or (N, C) multi-hot.
        num_classes: C.
        l2: weight of 1/2 ||W||^2, > 0.
        max_iter: L-BFGS iterations.
    """
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} features but {y.shape[0]} labels")
    multi = y.ndim == 2
    xd = x.detach().double().cpu()
    mean = xd.mean(0)
    std = xd.std(0, unbiased=False).clamp_min(1e-6)
    z = (xd - mean) / std
    w = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    target = y.double().cpu() if multi else y.long().cpu()
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
        tolerance_change=1e-12, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = z @ w.T + b
        if multi:
            data = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / z.shape[0]
        else:
            data = F.cross_entropy(logits, target)
        loss = data + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    # Small problems: one thread, as thread hand-offs cost far more than these tiny matmuls.
    threads = torch.get_num_threads()
    if z.numel() < 2_000_000:
        torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return LogisticModel(w.detach(), b.detach(), mean, std, multi)


def probe_metrics(model: LogisticModel, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Test metrics: top1 and macro_f1, or map, micro_f1 and macro_f1 (threshold 0.5) if multi-label."""
    scores = model.scores(x).numpy()
    target = y.cpu().numpy()
    if model.multi_label:
        micro, macro = multilabel_f1(scores >= 0.5, target)
        return {"map": mean_average_precision(scores, target), "micro_f1": micro, "macro_f1": macro}
    pred = scores.argmax(1)
    return {"top1": top1(pred, target), "macro_f1": macro_f1(pred, target)}


def select_l2(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, grid: tuple[float, ...] | list[float], seed: int,
    val_fraction: float = 0.2,
) -> tuple[float, dict[str, float]]:
    """Pick l2 on a seeded stratified validation part of the training set.

    Returns:
        (best l2, validation score per l2); the score is top1 (mAP if multi-label), ties go to the
        first l2 of ``grid``.
    """
    if len(grid) == 1:
        return float(grid[0]), {}
    tr, va = stratified_split(y.cpu().numpy(), val_fraction, seed)
    key = "map" if y.ndim == 2 else "top1"
    scores: dict[str, float] = {}
    for l2 in grid:
        model = fit_logistic(x[tr], y[tr], num_classes, l2)
        scores[repr(float(l2))] = probe_metrics(model, x[va], y[va])[key]
    best = max(grid, key=lambda v: (scores[repr(float(v))], -list(grid).index(v)))
    return float(best), scores


def linear_probe_evaluate(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    num_classes: int, l2_grid: tuple[float, ...] | list[float] = L2_GRID, seed: int = 0,
) -> dict:
    """Select l2 on the training set, refit on all of it, and score the test set.

    Returns:
        ``{"l2": chosen, "val": {l2: score}, **test metrics}``.
    """
    l2, val = select_l2(train_x, train_y, num_classes, l2_grid, seed)
    model = fit_logistic(train_x, train_y, num_classes, l2)
    return {"l2": l2, "val": val, **probe_metrics(model, test_x, test_y)}


def few_shot_evaluate(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    num_classes: int, l2: float, shots: tuple[int, ...] | list[int] = FEW_SHOTS, trials: int = 5,
    seed: int = 0,
) -> dict:
    """Linear probes on n training samples per class, averaged over seeded draws.

    Args:
        l2: probe strength (the one chosen for the full probe).
        shots: samples per class.
        trials: draws per shot count (draw t uses seed ``seed + t``).

    Returns:
        ``{str(n): {"top1": mean, "top1_std": std, "macro_f1": mean, "trials": t}}``; a size that the
        smallest class cannot fill gets ``{"skipped": reason}`` (its draw would really be fewer-shot).
    """
    if train_y.ndim != 1:
        raise ValueError("few-shot probes need single-label data (multi-label sets have no per-class draw)")
    out: dict[str, dict[str, Any]] = {}
    labels = train_y.cpu().numpy()
    smallest = int(np.bincount(labels)[np.unique(labels)].min())
    for n in shots:
        if n > smallest:
            out[str(n)] = {"skipped": f"the smallest class has {smallest} training samples, fewer than {n}"}
            continue
        runs = []
        for t in range(trials):
            idx = torch.from_numpy(sample_per_class(labels, n, seed + t))
            model = fit_logistic(train_x[idx], train_y[idx], num_classes, l2)
            runs.append(probe_metrics(model, test_x, test_y))
        acc = np.array([r["top1"] for r in runs])
        out[str(n)] = {
            "top1": float(acc.mean()), "top1_std": float(acc.std()),
            "macro_f1": float(np.mean([r["macro_f1"] for r in runs])), "trials": trials,
        }
    return out
