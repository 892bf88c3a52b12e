"""The kNN probe run by the training loop every ``probe.every`` steps (the sweep's ``probe/knn_avg``).

Plain torch, no Ray, no collectives: the loop calls it on one rank (rank 0) with the unwrapped
student. The labelled set is read once, capped to ``max_samples`` (seeded, stratified) and split
80/20 per class; each call extracts pooled features and runs the weighted kNN of
:mod:`deo.eval.knn`.

Example:
    >>> probe = build_knn_probe(cfg.probe, stats)          # None when probe.every == 0
    >>> if probe and step % cfg.probe.every == 0:
    ...     metrics.update(probe(student, device))         # {"probe/knn_avg": ..., "probe/knn_k5": ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from deo.bands import true_colour_max
from deo.eval.datasets import detect_modality, load_images, load_labelled_set, s2_true_colour
from deo.eval.features import student_features
from deo.eval.knn import KNN_KS, KNN_TEMPERATURE, knn_evaluate
from deo.eval.splits import stratified_split


class KnnProbe:
    """A held-out labelled set in memory and the kNN protocol to score a student on it."""

    def __init__(
        self,
        dataset: str,
        stats: dict[str, dict[str, list[float]]],
        s2_band_order: str | Sequence[str] = "eurosat",
        max_samples: int = 512,
        modality: str = "ms",
        test_fraction: float = 0.2,
        seed: int = 0,
        ks: tuple[int, ...] = KNN_KS,
        temperature: float = KNN_TEMPERATURE,
        batch_size: int = 64,
        image_size: int = 0,
    ) -> None:
        """Read ``dataset`` once.

        Args:
            dataset: labelled set (class folders or .csv/.parquet list).
            stats: normalisation stats per modality (the shard manifest's).
            s2_band_order: band order of stacked S2 files.
            max_samples: cap on samples read (seeded stratified subset; per-class rounding may keep a
                few less).
            modality: branch probed: ``ms``, or ``optical`` (RGB sets, or S2 true colour of MS sets).
            test_fraction: test share per class.
            seed: seed of the cap and the split.
            ks: kNN k values (clipped below the train size).
            temperature: vote temperature.
            batch_size: feature extraction batch.
            image_size: resize samples to this side (0: native).
        """
        if modality not in stats:
            raise ValueError(f"probe modality {modality!r} has no normalisation stats (have {sorted(stats)})")
        ds = load_labelled_set(dataset)
        if max_samples < len(ds):
            _, keep = stratified_split(ds.labels, max_samples / len(ds), seed)
            ds = ds.subset(keep)
        data_mod = detect_modality(ds.items[0])
        if modality == "ms" and data_mod != "ms":
            raise ValueError(f"probe modality 'ms' needs a multispectral set; {ds.items[0]} looks like RGB")
        x = load_images(ds, data_mod, s2_band_order, image_size)
        self.images = x if modality == data_mod else s2_true_colour(x, true_colour_max(stats))
        train, test = stratified_split(ds.labels, test_fraction, seed)
        self.train_idx, self.test_idx = torch.from_numpy(train), torch.from_numpy(test)
        self.labels = torch.from_numpy(np.asarray(ds.labels))
        self.num_classes = len(ds.classes)
        self.stats = stats[modality]
        self.modality = modality
        self.ks, self.temperature, self.batch_size = tuple(ks), temperature, batch_size

    @torch.no_grad()
    def __call__(self, student: nn.Module, device: str | torch.device = "cpu") -> dict[str, float]:
        """Score ``student`` (left in the train/eval mode it had).

        Returns:
            ``{"probe/knn_avg": mean accuracy over the k used, "probe/knn_k<k>": accuracy per k}``
            (mAP instead of accuracy for multi-label sets).
        """
        feats = student_features(student, self.images, self.modality, self.stats, self.batch_size, device)
        res = knn_evaluate(
            feats[self.train_idx], self.labels[self.train_idx], feats[self.test_idx], self.labels[self.test_idx],
            self.num_classes, self.ks, self.temperature,
        )
        out = {"probe/knn_avg": res["knn_avg"]}
        out.update({f"probe/knn_k{k}": m[res["metric"]] for k, m in res["per_k"].items()})
        return out


def build_knn_probe(probe_cfg: Any, stats: dict[str, dict[str, list[float]]], seed: int = 0) -> KnnProbe | None:
    """The probe of a ``ProbeConfig`` (``every``, ``dataset``, ``s2_band_order``, ``max_samples``), or None if off.

    Raises:
        ValueError: ``probe.every`` > 0 without ``probe.dataset``.
    """
    if probe_cfg.every <= 0:
        return None
    if not probe_cfg.dataset:
        raise ValueError(f"probe.every={probe_cfg.every} needs probe.dataset (a labelled set, e.g. EuroSAT-MS)")
    return KnnProbe(probe_cfg.dataset, stats, probe_cfg.s2_band_order, probe_cfg.max_samples, seed=seed)
