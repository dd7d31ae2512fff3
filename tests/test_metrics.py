"""Classification metrics equal scikit-learn's; bootstrap CIs behave."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from evaluation import metrics as M


def _random_case(seed: int, n: int = 400, c: int = 5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 2.0 * np.eye(c)[y] * rng.random((n, 1))
    logits = np.round(logits, 1)  # creates ties in the scores
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = proba.argmax(1)
    return y, pred, proba


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn(seed):
    c = 5
    y, pred, proba = _random_case(seed, c=c)
    assert M.accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred))
    assert M.balanced_accuracy(y, pred, c) == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert M.f1_macro(y, pred, c) == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert M.f1_weighted(y, pred, c) == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert M.auroc_ovr(y, proba, c) == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    np.testing.assert_array_equal(M.confusion_matrix(y, pred, c), skm.confusion_matrix(y, pred, labels=range(c)))
    pcs = M.per_class_scores(y, pred, c)
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=range(c), zero_division=0)
    np.testing.assert_allclose(pcs["precision"], p)
    np.testing.assert_allclose(pcs["recall"], r)
    np.testing.assert_allclose(pcs["f1"], f)
    np.testing.assert_allclose(pcs["support"], s)


def test_metrics_with_a_class_never_predicted_and_binary_auroc():
    y = np.array([0, 0, 1, 1, 2, 2, 2, 1])
    pred = np.array([0, 0, 1, 0, 0, 0, 1, 1])  # class 2 never predicted
    assert M.f1_macro(y, pred, 3) == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert M.balanced_accuracy(y, pred, 3) == pytest.approx(skm.balanced_accuracy_score(y, pred))
    yb = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1])
    sb = np.array([0.1, 0.4, 0.4, 0.4, 0.9, 0.2, 0.8, 0.7, 0.3])  # ties across classes
    proba = np.stack([1 - sb, sb], 1)
    assert M.auroc_ovr(yb, proba, 2) == pytest.approx(skm.roc_auc_score(yb, sb))
    assert np.isnan(M.binary_auroc(np.zeros(4, bool), np.arange(4.0)))


def test_bootstrap_ci_brackets_point_and_is_seeded():
    y, pred, proba = _random_case(3, n=300, c=4)
    a = M.bootstrap_ci(y, pred, 4, proba, n_boot=200, seed=7)
    b = M.bootstrap_ci(y, pred, 4, proba, n_boot=200, seed=7)
    assert a == b
    for name, v in a.items():
        assert v["low"] <= v["value"] <= v["high"], name
        assert v["high"] - v["low"] > 0, name
    # more items -> narrower interval
    y2, p2, pr2 = _random_case(3, n=3000, c=4)
    wide = a["accuracy"]["high"] - a["accuracy"]["low"]
    c2 = M.bootstrap_ci(y2, p2, 4, pr2, n_boot=200, seed=7)
    assert c2["accuracy"]["high"] - c2["accuracy"]["low"] < wide
