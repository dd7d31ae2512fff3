"""Cross-validated kNN and linear-probe balanced accuracy over group-aware folds: pure functions over
feature arrays (used by ``benchmarks/quality_eval.py`` and the demo's labelled check).

Protocol
    Outer folds: leave-one-group-out when there are at most ``max_folds`` groups, otherwise a group
    k-fold with ``max_folds`` folds whose groups are dealt class by class (stratified by each group's
    majority label). A group (tile, source slide, patient) is never on both sides, and every item gets
    exactly one out-of-fold prediction. A test item whose class has no example in its fold's training
    part cannot be predicted correctly by any encoder; it is left out of the score and reported
    (``unscorable``). Inside each fold the training part is split again by group (``inner_folds``
    folds, leave-one-group-out when fewer groups); k (kNN, DINO weighted vote) and L2 (linear probe)
    maximise the pooled inner out-of-fold balanced accuracy (ties: larger k, stronger L2), then the
    model is refitted on the whole training part and predicts the test fold. CIs resample whole groups
    (or whole source images when there are too few groups).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

DEFAULT_K_GRID = (1, 3, 5, 10, 20)
DEFAULT_L2_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0)  # on standardised features: loss = mean CE + l2·|W|²/2
KNN_TEMPERATURE = 0.07


def make_folds(labels, groups, max_folds: int = 10, seed: int = 0) -> tuple[np.ndarray, str]:
    """Fold index of every item: leave-one-group-out when there are at most ``max_folds`` groups,
    otherwise ``max_folds`` folds with whole groups dealt class by class (each group counts for its
    majority label; it goes to the fold with the fewest items of that label, then fewest items overall,
    ties broken by a seeded shuffle). Returns ``(fold, scheme)``."""
    labels = np.asarray(labels)
    groups = np.asarray([str(g) for g in groups])
    uniq, codes = np.unique(groups, return_inverse=True)
    n_groups = len(uniq)
    if n_groups < 2:
        raise ValueError(f"a group-aware split needs at least 2 groups, got {n_groups}")
    if n_groups <= max_folds:
        return codes.astype(np.int64), f"leave-one-group-out ({n_groups} folds)"
    rng = np.random.default_rng(seed)
    sizes = np.bincount(codes, minlength=n_groups)
    majority = np.array([np.bincount(labels[codes == g]).argmax() for g in range(n_groups)])
    order = rng.permutation(n_groups)
    order = order[np.lexsort((-sizes[order], majority[order]))]  # by label, big groups first, shuffled ties
    n_lab = int(labels.max()) + 1
    per_label = np.zeros((max_folds, n_lab), np.int64)
    total = np.zeros(max_folds, np.int64)
    tiebreak = rng.permutation(max_folds)
    group_fold = np.empty(n_groups, np.int64)
    for g in order:
        f = min(range(max_folds), key=lambda q: (per_label[q, majority[g]], total[q], tiebreak[q]))
        group_fold[g] = f
        per_label[f] += np.bincount(labels[codes == g], minlength=n_lab)
        total[f] += sizes[g]
    return group_fold[codes], f"group {max_folds}-fold, stratified by the groups' majority label"


# --------------------------------------------------------------------------------------------------
# classification scores

def _balanced_acc_from_cm(cm: np.ndarray) -> np.ndarray:
    """Balanced accuracy of (..., C, C) confusion matrices (rows = truth), over the classes present."""
    support = cm.sum(-1)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
    present = (support > 0).sum(-1)
    return np.where(present > 0, recall.sum(-1) / np.maximum(present, 1), np.nan)


def group_bootstrap(y_true, y_pred, units, num_classes: int, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of balanced accuracy resampling whole ``units`` (all items of a unit together)."""
    from evaluation.metrics import confusion_matrix

    y_true, y_pred, units = np.asarray(y_true), np.asarray(y_pred), np.asarray(units)
    uniq = np.unique(units)
    if len(uniq) == 0 or n_boot < 1:
        return float("nan"), float("nan")
    cms = np.stack([confusion_matrix(y_true[units == u], y_pred[units == u], num_classes) for u in uniq])
    rng = np.random.default_rng(seed)
    vals = []
    for start in range(0, n_boot, 250):  # bounded memory
        idx = rng.integers(0, len(uniq), (min(250, n_boot - start), len(uniq)))
        vals.append(_balanced_acc_from_cm(cms[idx].sum(1)))
    vals = np.concatenate(vals)
    vals = vals[~np.isnan(vals)]
    a = (1 - level) / 2
    return (float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))) if vals.size else (float("nan"),) * 2


def _select_knn(x, y, inner: np.ndarray, num_classes: int, k_grid: Sequence[int], temperature: float):
    import torch

    from evaluation.knn import knn_classify
    from evaluation.metrics import balanced_accuracy

    folds = np.unique(inner)
    min_bank = min(int((inner != f).sum()) for f in folds)
    ks = sorted({int(k) for k in k_grid if k <= min_bank}) or [min_bank]
    preds = {k: np.full(len(y), -1, np.int64) for k in ks}
    for f in folds:
        te, tr = inner == f, inner != f
        res = knn_classify(x[tr], torch.as_tensor(y[tr]), x[te], num_classes, ks=ks, temperature=temperature,
                           backend="torch")
        for k in ks:
            preds[k][te] = res[k]["pred"].numpy()
    scores = {k: balanced_accuracy(y, preds[k], num_classes) for k in ks}
    best = max(ks, key=lambda k: (scores[k], k))  # ties: the larger k (smoother vote)
    return best, scores


def _select_l2(x, y, inner: np.ndarray, num_classes: int, l2_grid: Sequence[float], max_iter: int):
    from evaluation.linear import fit_logistic
    from evaluation.metrics import balanced_accuracy

    folds = np.unique(inner)
    scores = {}
    for l2 in sorted(float(v) for v in l2_grid):
        pred = np.full(len(y), -1, np.int64)
        for f in folds:
            te, tr = inner == f, inner != f
            model = fit_logistic(x[tr], y[tr], num_classes, l2, "standard", max_iter)
            pred[te] = model.predict(x[te]).numpy()
        scores[l2] = balanced_accuracy(y, pred, num_classes)
    best = max(scores, key=lambda v: (scores[v], v))  # ties: stronger regularisation
    return best, scores


def crossval_scores(features: np.ndarray, labels, groups, class_names: Sequence[str], image_ids=None,
                    name: str = "", split_unit: str = "group", seed: int = 0, n_boot: int = 1000, *,
                    k_grid: Sequence[int] = DEFAULT_K_GRID, l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                    temperature: float = KNN_TEMPERATURE, max_folds: int = 5, inner_folds: int = 2,
                    min_group_units: int = 8, max_iter: int = 50, folds: np.ndarray | None = None,
                    default_k: int = 10, default_l2: float = 1e-2) -> dict:
    """kNN and linear-probe balanced accuracy of ``features`` (N, D) with ``labels`` (N,) in
    ``[0, len(class_names))`` and the split unit ``groups`` (N,) (module doc: protocol); ``image_ids``
    (default: the groups) are the bootstrap units when there are fewer than ``min_group_units`` groups.

    ``seed`` drives the group k-fold deal (tasks with more than ``max_folds`` groups), the inner folds and
    the bootstrap. ``folds`` overrides the outer fold of each item. The CI resamples whole groups when there
    are at least ``min_group_units`` of them, else whole source images (``ci_unit`` = ``"group"`` or
    ``"image"``, ``ci_note`` says why). ``scored`` marks the items that enter the scores.

    Returns ``{"knn": {...}, "linear": {...}, "chance", "counts", "folds", "ci_unit", "per_fold", ...}``;
    each method has ``balanced_accuracy`` = ``{"value", "low", "high"}``, ``accuracy``, per-class recall,
    ``chosen`` (k or L2 per fold) and ``oof_pred`` (one out-of-fold prediction per item).
    """
    import torch

    from evaluation.knn import knn_classify
    from evaluation.linear import fit_logistic
    from evaluation.metrics import accuracy, balanced_accuracy, per_class_scores

    t0 = time.perf_counter()
    x_np = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    groups = np.asarray([str(g) for g in groups])
    image_ids = np.asarray([str(g) for g in (groups if image_ids is None else image_ids)])
    class_names = list(class_names)
    if x_np.ndim != 2 or x_np.shape[0] != len(y):
        raise ValueError(f"features must be (N, D) with N = {len(y)} items of task {name}; got {x_np.shape}")
    if not np.isfinite(x_np).all():
        raise ValueError(f"features of task {name} contain NaN/inf")
    x = torch.from_numpy(x_np)
    c = len(class_names)
    if folds is None:
        fold, scheme = make_folds(y, groups, max_folds, seed)
    else:
        fold = np.asarray(folds, dtype=np.int64)
        if fold.shape != y.shape:
            raise ValueError(f"folds must give one fold per item ({len(y)}), got shape {fold.shape}")
        scheme = "given"
        for g in np.unique(groups):
            if len(set(fold[groups == g])) > 1:
                raise ValueError(f"the given folds split group {g!r} across folds")

    knn_pred = np.full(len(y), -1, np.int64)
    lin_pred = np.full(len(y), -1, np.int64)
    scorable = np.ones(len(y), bool)
    per_fold = []
    for f in np.unique(fold):
        te = np.flatnonzero(fold == f)
        tr = np.flatnonzero(fold != f)
        train_classes = set(y[tr].tolist())
        missing = sorted(set(range(c)) - train_classes)
        miss_test = np.isin(y[te], missing)
        scorable[te[miss_test]] = False
        rec = {"fold": int(f), "test_groups": sorted(set(groups[te].tolist())), "n_train": int(tr.size),
               "n_test": int(te.size), "missing_train_classes": [class_names[m] for m in missing],
               "unscorable_test_items": int(miss_test.sum())}
        xtr, ytr = x[tr], y[tr]
        if len(set(groups[tr].tolist())) >= 2:
            inner, _ = make_folds(ytr, groups[tr], inner_folds, seed + 1000 + int(f))
            k, k_scores = _select_knn(xtr, ytr, inner, c, k_grid, temperature)
            l2, l2_scores = _select_l2(xtr, ytr, inner, c, l2_grid, max_iter)
            inner_missing = sum(len(set(ytr.tolist()) - set(ytr[inner != q].tolist())) for q in np.unique(inner))
            rec.update({"inner_folds": int(len(np.unique(inner))),
                        "inner_missing_class_folds": int(inner_missing)})
        else:  # one training group: nothing to validate on without touching the test fold
            k, k_scores = min(default_k, tr.size), {}
            l2, l2_scores = default_l2, {}
            rec.update({"inner_folds": 0, "selection": "defaults (one training group, no validation split)"})
        knn_pred[te] = knn_classify(xtr, torch.as_tensor(ytr), x[te], c, ks=(k,), temperature=temperature,
                                    backend="torch")[k]["pred"].numpy()
        lin_pred[te] = fit_logistic(xtr, ytr, c, l2, "standard", max_iter).predict(x[te]).numpy()
        rec.update({"knn_k": int(k), "knn_inner_balanced_accuracy": {str(a): float(b) for a, b in k_scores.items()},
                    "linear_l2": float(l2),
                    "linear_inner_balanced_accuracy": {f"{a:g}": float(b) for a, b in l2_scores.items()}})
        per_fold.append(rec)
    assert (knn_pred >= 0).all() and (lin_pred >= 0).all(), "every item has one out-of-fold prediction"

    n_groups = len(set(groups.tolist()))
    if n_groups >= min_group_units:
        units, unit_name = groups, "group"
        unit_note = f"whole groups ({split_unit}) resampled"
    else:
        units, unit_name = image_ids, "image"
        unit_note = (f"whole source images resampled: only {n_groups} groups, a group bootstrap would be "
                     "degenerate; this CI ignores between-group variance")
    s = scorable
    scored_classes = sorted(set(y[s].tolist()))
    out: dict = {
        "task": name, "seed": int(seed), "n_boot": int(n_boot),
        "chance": 1.0 / max(1, len(scored_classes)),
        "counts": {"items": int(len(y)), "scored": int(s.sum()), "unscorable": int((~s).sum()),
                   "groups": int(n_groups), "images": int(len(set(image_ids.tolist()))), "classes": int(c),
                   "scored_classes": [class_names[i] for i in scored_classes],
                   "features_dim": int(x_np.shape[1])},
        "folds": {"scheme": scheme, "n_folds": int(len(np.unique(fold))),
                  "inner": f"group {inner_folds}-fold (leave-one-group-out when fewer groups) inside each training part",
                  "fold_of_item": fold.tolist()},
        "ci_unit": unit_name, "ci_note": unit_note, "n_ci_units": int(len(set(units[s].tolist()))),
        "scored": s.tolist(),
        "grids": {"k": [int(k) for k in k_grid], "l2": [float(v) for v in l2_grid], "temperature": temperature},
        "per_fold": per_fold,
    }
    if (~s).any():
        out["unscorable_note"] = ("test items whose class is absent from their fold's training part are left out "
                                  "of the scores (no encoder could classify them)")
    for name, pred, chosen in (("knn", knn_pred, [r["knn_k"] for r in per_fold]),
                               ("linear", lin_pred, [r["linear_l2"] for r in per_fold])):
        value = balanced_accuracy(y[s], pred[s], c)
        low, high = group_bootstrap(y[s], pred[s], units[s], c, n_boot, seed)
        recall = per_class_scores(y[s], pred[s], c)["recall"]
        out[name] = {"balanced_accuracy": {"value": float(value), "low": low, "high": high},
                     "accuracy": accuracy(y[s], pred[s]),
                     "per_class_recall": {class_names[i]: float(recall[i]) for i in scored_classes},
                     "chosen": chosen, "oof_pred": pred.tolist()}
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out
