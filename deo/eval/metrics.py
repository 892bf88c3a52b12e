"""Classification metrics of the probes: top-1, macro/micro F1 and mean average precision.

Written in numpy so the probes need no scikit-learn at run time; the tests compare each one with
scikit-learn's implementation.
"""

from __future__ import annotations

import numpy as np


def top1(pred: np.ndarray, target: np.ndarray) -> float:
    """Fraction of correct predictions.

    Args:
        pred: (N,) predicted class indices.
        target: (N,) true class indices.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} differs from target shape {target.shape}")
    return float((pred == target).mean()) if len(pred) else float("nan")


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros(tp.shape, dtype=np.float64), where=denom > 0)


def macro_f1(pred: np.ndarray, target: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``target`` or ``pred``.

    Args:
        pred: (N,) predicted class indices.
        target: (N,) true class indices.
    """
    labels = np.union1d(pred, target)
    tp = np.array([np.sum((pred == c) & (target == c)) for c in labels], dtype=np.float64)
    fp = np.array([np.sum((pred == c) & (target != c)) for c in labels], dtype=np.float64)
    fn = np.array([np.sum((pred != c) & (target == c)) for c in labels], dtype=np.float64)
    return float(_f1(tp, fp, fn).mean())


def multilabel_f1(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Micro and macro F1 of multi-label predictions.

    Args:
        pred: (N, C) 0/1 predictions.
        target: (N, C) 0/1 labels.

    Returns:
        (micro F1, macro F1); macro averages every class (a class never true nor predicted counts 0,
        as scikit-learn's ``zero_division=0``).
    """
    p, t = pred.astype(bool), target.astype(bool)
    tp = (p & t).sum(0).astype(np.float64)
    fp = (p & ~t).sum(0).astype(np.float64)
    fn = (~p & t).sum(0).astype(np.float64)
    micro = _f1(tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True))[0]
    return float(micro), float(_f1(tp, fp, fn).mean())


def average_precision(scores: np.ndarray, target: np.ndarray) -> float:
    """Average precision of one class: sum over thresholds of (R_n - R_{n-1}) P_n.

    Tied scores form one threshold, as in scikit-learn's ``average_precision_score``.

    Args:
        scores: (N,) confidence for the class.
        target: (N,) 0/1 labels; needs at least one positive.
    """
    positives = float(target.sum())
    if positives == 0:
        raise ValueError("average_precision needs at least one positive label")
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], target[order].astype(np.float64)
    last_of_group = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(t)[last_of_group]
    fp = (last_of_group + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores: np.ndarray, target: np.ndarray) -> float:
    """Macro mAP over the classes with at least one positive.

    Args:
        scores: (N, C) confidences.
        target: (N, C) 0/1 labels.
    """
    cols = [c for c in range(target.shape[1]) if target[:, c].any()]
    if not cols:
        return float("nan")
    return float(np.mean([average_precision(scores[:, c], target[:, c]) for c in cols]))
