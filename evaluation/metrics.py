"""Classification metrics as pure functions over label/probability arrays (checked against scikit-learn).

All functions take integer labels ``y_true``/``y_pred`` in ``[0, num_classes)`` and, for AUROC,
class probabilities ``proba`` of shape ``(N, C)``. Tensors or arrays are accepted.
"""

from __future__ import annotations


import numpy as np


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts; rows = true class, columns = predicted class."""
    t, p = _np(y_true).astype(np.int64), _np(y_pred).astype(np.int64)
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(y_true, y_pred) -> float:
    t, p = _np(y_true), _np(y_pred)
    return float((t == p).mean()) if t.size else float("nan")


def _per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1).astype(np.float64)
    predicted = cm.sum(0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    return precision, recall, f1, support


def per_class_scores(y_true, y_pred, num_classes: int) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class (0 where undefined, as scikit-learn's zero_division=0)."""
    precision, recall, f1, support = _per_class(confusion_matrix(y_true, y_pred, num_classes))
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def balanced_accuracy(y_true, y_pred, num_classes: int) -> float:
    """Mean recall over the classes present in ``y_true`` (scikit-learn's ``balanced_accuracy_score``)."""
    _, recall, _, support = _per_class(confusion_matrix(y_true, y_pred, num_classes))
    present = support > 0
    return float(recall[present].mean()) if present.any() else float("nan")


def f1_macro(y_true, y_pred, num_classes: int) -> float:
    """Unweighted mean F1 over the classes present in either ``y_true`` or ``y_pred`` (as scikit-learn)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    _, _, f1, _ = _per_class(cm)
    present = (cm.sum(0) + cm.sum(1)) > 0
    return float(f1[present].mean()) if present.any() else float("nan")


def f1_weighted(y_true, y_pred, num_classes: int) -> float:
    _, _, f1, support = _per_class(confusion_matrix(y_true, y_pred, num_classes))
    total = support.sum()
    return float((f1 * support).sum() / total) if total else float("nan")


def binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic with average ranks for ties."""
    positive = _np(positive).astype(bool)
    scores = _np(scores).astype(np.float64)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # average rank of each run of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [scores.size]])
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of the run
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auroc_ovr(y_true, proba, num_classes: int) -> float:
    """Macro one-vs-rest AUROC over the classes that have both positives and negatives in ``y_true``.
    Binary problems (C = 2) use the positive-class probability, as scikit-learn does."""
    t, p = _np(y_true).astype(np.int64), _np(proba).astype(np.float64)
    if num_classes == 2:
        return binary_auroc(t == 1, p[:, 1])
    values = [binary_auroc(t == c, p[:, c]) for c in range(num_classes)]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def classification_metrics(y_true, y_pred, num_classes: int, proba=None) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro/weighted F1 and (with ``proba``) macro OvR AUROC."""
    out = {
        "accuracy": accuracy(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred, num_classes),
        "f1_macro": f1_macro(y_true, y_pred, num_classes),
        "f1_weighted": f1_weighted(y_true, y_pred, num_classes),
    }
    if proba is not None:
        out["auroc_ovr"] = auroc_ovr(y_true, proba, num_classes)
    return out


def bootstrap_ci(y_true, y_pred, num_classes: int, proba=None, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95, groups=None) -> dict[str, dict[str, float]]:
    """Percentile bootstrap confidence intervals of :func:`classification_metrics` (resampling test items,
    or with ``groups`` (N,) whole groups — e.g. patients — with all their items).

    Returns ``{metric: {"value", "low", "high"}}``; resamples where a metric is undefined are dropped.
    """
    t, p = _np(y_true), _np(y_pred)
    pr = None if proba is None else _np(proba)
    point = classification_metrics(t, p, num_classes, pr)
    rng = np.random.default_rng(seed)
    n = t.size
    members = None
    if groups is not None:
        _, codes = np.unique(np.asarray([str(g) for g in _np(groups).tolist()]), return_inverse=True)
        members = [np.flatnonzero(codes == g) for g in range(int(codes.max()) + 1 if n else 0)]
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(int(n_boot)):
        if members is None:
            idx = rng.integers(0, n, n)
        else:
            idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        vals = classification_metrics(t[idx], p[idx], num_classes, None if pr is None else pr[idx])
        for k, v in vals.items():
            if not np.isnan(v):
                samples[k].append(v)
    alpha = (1.0 - level) / 2.0
    out = {}
    for k, v in point.items():
        s = np.asarray(samples[k])
        low, high = (np.quantile(s, [alpha, 1 - alpha]) if s.size else (np.nan, np.nan))
        out[k] = {"value": float(v), "low": float(low), "high": float(high)}
    return out
