"""MIL results: metrics per fold and pooled over folds with patient-bootstrap CIs, prediction CSVs,
ROC curves and the confusion matrix (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from evaluation.metrics import bootstrap_ci, classification_metrics, confusion_matrix
from evaluation.reports import _plt, plot_confusion, save_figure, write_csv

HEADLINE = ("auroc_ovr", "balanced_accuracy", "f1_macro")


def roc_curve(positive, scores) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of binary ``positive`` against ``scores``, one point per distinct score, from (0, 0)."""
    positive = np.asarray(positive, bool)
    scores = np.asarray(scores, np.float64)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order]
    cut = np.r_[np.flatnonzero(np.diff(s)), y.size - 1] if y.size else np.zeros(0, np.int64)
    tp, fp = np.cumsum(y)[cut], np.cumsum(~y)[cut]
    n_pos, n_neg = max(1, int(y.sum())), max(1, int((~y).sum()))
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def metrics_with_ci(y, proba, num_classes: int, patients, n_boot: int, seed: int) -> dict:
    """``{metric: {"value", "low", "high"}}`` (classification metrics of ``argmax(proba)``), CIs by patient."""
    pred = np.asarray(proba).argmax(1)
    if n_boot > 0 and len(y):
        return bootstrap_ci(y, pred, num_classes, proba, n_boot=n_boot, seed=seed, groups=patients)
    return {k: {"value": v} for k, v in classification_metrics(y, pred, num_classes, proba).items()}


def plot_roc(y, proba, classes: Sequence[str], path: str | Path, folds=None, title: str = "") -> Path:
    """One-vs-rest ROC curve per class (binary: of the positive class) of the pooled predictions, and
    thin per-fold curves when ``folds`` is given."""
    from evaluation.metrics import binary_auroc

    plt = _plt()
    y, proba = np.asarray(y), np.asarray(proba)
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    shown = [1] if len(classes) == 2 else range(len(classes))
    cmap = plt.get_cmap("tab10")
    for i, c in enumerate(shown):
        pos = y == c
        if pos.all() or not pos.any():
            continue
        fpr, tpr = roc_curve(pos, proba[:, c])
        ax.plot(fpr, tpr, color=cmap(i % 10), lw=2, label=f"{classes[c]} (AUC {binary_auroc(pos, proba[:, c]):.3f})")
        if folds is not None:
            for f in np.unique(folds):
                m = folds == f
                if pos[m].any() and not pos[m].all():
                    ax.plot(*roc_curve(pos[m], proba[m, c]), color=cmap(i % 10), lw=0.7, alpha=0.35)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "ROC, pooled over folds (thin: per fold)", fontsize=9)
    return save_figure(fig, path)


def prediction_rows(cohort, indices, proba, fold: int, split: str) -> list[dict]:
    """One CSV row per slide: slide, patient, fold, split, true and predicted class, class probabilities."""
    rows = []
    for j, p in zip(indices, proba):
        rows.append({"slide_id": cohort.slides[j], "patient": cohort.patients[j], "fold": fold, "split": split,
                     "label": cohort.classes[cohort.labels[j]], "pred": cohort.classes[int(np.argmax(p))],
                     **{f"prob_{c}": float(v) for c, v in zip(cohort.classes, p)}})
    return rows


def write_report(out: Path, cohort, per_fold: list[dict], pooled: dict, plots: bool) -> dict[str, str]:
    """``metrics.csv`` (per fold + pooled), ``predictions.csv`` (every test slide), ``roc.png`` and
    ``confusion.png``/``confusion.csv`` of the pooled test predictions; returns the written paths."""
    rows = []
    for rec in per_fold + [pooled]:
        for name, v in rec["metrics"].items():
            rows.append({"fold": rec["fold"], "metric": name, **v})
    files = {"metrics_csv": str(write_csv(out / "metrics.csv", rows))}
    y, proba, folds = pooled["y"], pooled["proba"], pooled["folds"]
    files["predictions_csv"] = str(write_csv(out / "predictions.csv", pooled["rows"]))
    c = len(cohort.classes)
    cm = confusion_matrix(y, proba.argmax(1), c) if len(y) else np.zeros((c, c), np.int64)
    files["confusion_csv"] = str(write_csv(out / "confusion.csv", [
        {"true": cls, **{p: int(cm[i, j]) for j, p in enumerate(cohort.classes)}} for i, cls in enumerate(cohort.classes)]))
    if plots and len(y):
        files["roc_png"] = str(plot_roc(y, proba, cohort.classes, out / "roc.png", folds))
        files["confusion_png"] = str(plot_confusion(cm, cohort.classes, out / "confusion.png",
                                                    "MIL test slides, pooled over folds"))
    pooled["confusion_matrix"] = cm.tolist()
    return files
