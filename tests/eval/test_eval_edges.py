"""Eval edges: which k are used, the multi-label vote threshold, mAP's classes, split bounds, few-shot draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deo.eval.knn import knn_evaluate, knn_ks
from deo.eval.metrics import mean_average_precision
from deo.eval.splits import sample_per_class, stratified_split


def test_knn_ks_drops_a_k_equal_to_the_train_size():
    assert knn_ks(10) == [5]
    assert knn_ks(11) == [5, 10]
    assert knn_ks(5) == [5]  # none below: the train size itself


def test_multilabel_knn_predicts_a_class_with_exactly_half_the_vote():
    # two equally similar neighbours, one per class: each class gets exactly half the weight -> positive
    train = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    train_y = torch.tensor([[1, 0], [0, 1]])
    out = knn_evaluate(train, train_y, torch.tensor([[1.0, 0.0]]), torch.tensor([[1, 1]]), 2, ks=(2,))
    assert out["per_k"]["2"]["micro_f1"] == pytest.approx(1.0)
    assert out["per_k"]["2"]["macro_f1"] == pytest.approx(1.0)


def test_map_counts_a_class_that_is_positive_everywhere():
    target = np.array([[1, 1], [1, 0], [1, 1], [1, 0]])
    scores = np.array([[0.9, 0.1], [0.8, 0.9], [0.7, 0.2], [0.6, 0.8]])
    # class 0: AP 1; class 1: positives ranked 3rd and 4th -> (1/3 + 2/4) / 2
    assert mean_average_precision(scores, target) == pytest.approx((1.0 + (1 / 3 + 2 / 4) / 2) / 2)


def test_stratified_split_keeps_one_train_sample_per_class_and_one_test_sample():
    labels = np.array([0, 0, 1, 1, 1, 2])
    train, test = stratified_split(labels, 0.9, seed=0)
    assert sorted(labels[test].tolist()) == [0, 1, 1]  # at most n - 1 per class; the singleton stays in train
    assert sorted(labels[train].tolist()) == [0, 1, 2]
    multi = np.eye(3, dtype=int)[[0, 1, 2]]
    tr, te = stratified_split(multi, 0.1, seed=0)
    assert len(te) == 1 and len(tr) == 2  # at least one test sample
    tr, te = stratified_split(multi, 0.99, seed=0)
    assert len(te) == 2 and len(tr) == 1  # at least one train sample


def test_few_shot_draws_are_random_per_seed_and_repeatable():
    labels = np.repeat(np.arange(3), 20)
    draws = {tuple(sample_per_class(labels, 2, seed)) for seed in range(5)}
    assert len(draws) > 1
    np.testing.assert_array_equal(sample_per_class(labels, 2, 7), sample_per_class(labels, 2, 7))
    d = sample_per_class(labels, 2, 3)
    assert np.bincount(labels[d]).tolist() == [2, 2, 2]
