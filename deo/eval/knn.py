"""Weighted k-nearest-neighbour classification on frozen features (DINO's kNN protocol).

Cosine similarity between L2-normalised features; each of the k nearest training samples votes for
its label(s) with weight exp(sim / T), T = 0.07 as in DINO. Equivalent plain loop, per test sample q::

    sims = [cos(q, x) for x in train]; nn = argsort(sims)[::-1][:k]
    votes[c] = sum(exp(sims[i] / T) for i in nn if label[i] == c);  pred = argmax(votes)

For multi-label sets the votes are divided by the sum of weights, giving a score in [0, 1] per label.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from deo.eval.metrics import macro_f1, mean_average_precision, multilabel_f1, top1

KNN_KS: tuple[int, ...] = (5, 10, 20, 50, 100, 200)
"""The k of the protocol (DESIGN.md); those not below the train size are dropped."""

KNN_TEMPERATURE = 0.07


def knn_ks(n_train: int, ks: tuple[int, ...] | list[int] = KNN_KS) -> list[int]:
    """The k values used for ``n_train`` training samples: those below it (or ``[n_train]`` if none).

    Raises:
        ValueError: ``n_train`` < 1 or a k < 1.
    """
    if n_train < 1:
        raise ValueError(f"kNN needs at least one training sample, got {n_train}")
    if any(k < 1 for k in ks):
        raise ValueError(f"kNN k values must be >= 1, got {list(ks)}")
    used = sorted({k for k in ks if k < n_train})
    return used or [n_train]


@torch.no_grad()
def knn_scores(
    train_feats: torch.Tensor,
    train_targets: torch.Tensor,
    test_feats: torch.Tensor,
    k: int,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> torch.Tensor:
    """Temperature-weighted votes of the k nearest training samples.

    Args:
        train_feats: (N, D) training features (any scale; normalised here).
        train_targets: (N, C) one-hot or multi-hot training labels.
        test_feats: (M, D) test features.
        k: neighbours, 1 <= k <= N.
        temperature: T of exp(sim / T).
        chunk: test samples per similarity block (bounds memory at chunk x N).

    Returns:
        (M, C) float32 vote totals per class.
    """
    if not 1 <= k <= train_feats.shape[0]:
        raise ValueError(f"k must be in [1, {train_feats.shape[0]}] (train size), got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    train = F.normalize(train_feats.float(), dim=1)
    targets = train_targets.float()
    out = []
    for start in range(0, test_feats.shape[0], chunk):
        q = F.normalize(test_feats[start : start + chunk].float(), dim=1)
        sims, idx = (q @ train.T).topk(k, dim=1)  # (m, k)
        weights = (sims / temperature).exp()
        out.append(torch.einsum("mk,mkc->mc", weights, targets[idx]))
    return torch.cat(out) if out else torch.zeros(0, targets.shape[1])


def knn_evaluate(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: tuple[int, ...] | list[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
) -> dict:
    """kNN accuracy for every usable k and their average ``knn_avg``.

    Args:
        train_feats: (N, D) features.
        train_labels: (N,) class indices, or (N, C) multi-hot for multi-label sets.
        test_feats: (M, D) features.
        test_labels: (M,) or (M, C), like ``train_labels``.
        num_classes: C.
        ks: candidate k; :func:`knn_ks` drops those not below N.
        temperature: vote temperature.

    Returns:
        ``{"ks": [...], "per_k": {k: metrics}, "knn_avg": float, "metric": name}``. Single-label
        metrics are ``top1`` and ``macro_f1`` and knn_avg averages top1; multi-label metrics are
        ``map``, ``micro_f1``, ``macro_f1`` (scores thresholded at 0.5) and knn_avg averages mAP.
    """
    multi = train_labels.ndim == 2
    if multi:
        targets = train_labels.float()
    else:
        targets = F.one_hot(train_labels.long(), num_classes).float()
    used = knn_ks(train_feats.shape[0], ks)
    per_k: dict[str, dict[str, float]] = {}
    y = test_labels.cpu().numpy()
    for k in used:
        if multi:
            # a column of ones collects the total weight of the k neighbours
            with_total = torch.cat([targets, torch.ones(len(targets), 1)], dim=1)
            votes = knn_scores(train_feats, with_total, test_feats, k, temperature).double()
            frac = votes[:, :-1] / votes[:, -1:]
            # rounded so that float error does not split ties (e.g. all k neighbours positive)
            scores = np.round(frac.cpu().numpy(), 6)
            micro, macro = multilabel_f1(scores >= 0.5, y)
            per_k[str(k)] = {"map": mean_average_precision(scores, y), "micro_f1": micro, "macro_f1": macro}
        else:
            votes = knn_scores(train_feats, targets, test_feats, k, temperature)
            pred = votes.argmax(1).cpu().numpy()
            per_k[str(k)] = {"top1": top1(pred, y), "macro_f1": macro_f1(pred, y)}
    metric = "map" if multi else "top1"
    avg = float(np.mean([m[metric] for m in per_k.values()]))
    return {"ks": used, "temperature": temperature, "metric": metric, "per_k": per_k, "knn_avg": avg}
