"""Evaluation reports: ``results.json``, CSV tables and PNG plots (confusion matrix, per-class scores,
a 2-D map of the features coloured by label and by slide)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from evaluation.metrics import confusion_matrix, per_class_scores
from sgcl.utils.atomic import atomic_path, atomic_write_json


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_csv(path: str | Path, rows: Sequence[dict]) -> Path:
    path = Path(path)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    return path


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: str | Path, title: str = "") -> Path:
    plt = _plt()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * n, 1.0 + 0.5 * n))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (row-normalised colour, counts)")
    return save_figure(fig, Path(path))


def plot_per_class(scores: dict[str, np.ndarray], classes: Sequence[str], path: str | Path, title: str = "") -> Path:
    plt = _plt()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * n + 2), 3.2))
    x = np.arange(n)
    for k, name in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (k - 1) * 0.27, scores[name], width=0.27, label=name)
    ax.set_xticks(x, classes, rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title(title or "per-class scores")
    return save_figure(fig, Path(path))


def embed_2d(features, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N, 2) coordinates: PCA (default) or t-SNE of the L2-normalised features."""
    x = np.asarray(features.detach().cpu().numpy() if hasattr(features, "detach") else features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if method == "tsne" and len(x) > 5:
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), random_state=seed, init="pca").fit_transform(x)
    x = x - x.mean(0)
    if len(x) < 2:
        return np.zeros((len(x), 2))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    out = x @ vt[:2].T
    return out if out.shape[1] == 2 else np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


def plot_feature_map(xy: np.ndarray, colour_by: Sequence[str], path: str | Path, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    names = sorted(set(colour_by))
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    arr = np.asarray(colour_by)
    for i, name in enumerate(names):
        m = arr == name
        ax.scatter(xy[m, 0], xy[m, 1], s=8, color=cmap(i % cmap.N), label=name if len(names) <= 20 else None)
    if len(names) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return save_figure(fig, Path(path))


def classification_report(out_dir: str | Path, name: str, y_true, y_pred, classes: Sequence[str],
                          summary: dict, plots: bool = True) -> dict[str, str]:
    """Confusion matrix + per-class CSV/PNG for one prediction set; returns the written paths."""
    out_dir = Path(out_dir)
    c = len(classes)
    cm = confusion_matrix(y_true, y_pred, c)
    pcs = per_class_scores(y_true, y_pred, c)
    rows = [{"class": cls, **{k: float(pcs[k][i]) for k in ("precision", "recall", "f1", "support")}}
            for i, cls in enumerate(classes)]
    paths = {"per_class_csv": str(write_csv(out_dir / f"{name}_per_class.csv", rows))}
    cm_rows = [{"true": cls, **{p: int(cm[i, j]) for j, p in enumerate(classes)}} for i, cls in enumerate(classes)]
    paths["confusion_csv"] = str(write_csv(out_dir / f"{name}_confusion.csv", cm_rows))
    if plots:
        paths["confusion_png"] = str(plot_confusion(cm, classes, out_dir / f"{name}_confusion.png", f"{name}: confusion matrix"))
        paths["per_class_png"] = str(plot_per_class(pcs, classes, out_dir / f"{name}_per_class.png", f"{name}: per-class scores"))
    summary.setdefault("confusion_matrix", {})[name] = cm.tolist()
    return paths


def feature_maps(out_dir: str | Path, features, labels: Sequence[str], slides: Sequence[str] | None,
                 method: str = "pca") -> dict[str, str]:
    out_dir = Path(out_dir)
    xy = embed_2d(features, method)
    paths = {"map_by_label_png": str(plot_feature_map(xy, labels, out_dir / "features_by_label.png",
                                                      f"features ({method.upper()}) by label"))}
    if slides is not None:
        paths["map_by_slide_png"] = str(plot_feature_map(xy, slides, out_dir / "features_by_slide.png",
                                                         f"features ({method.upper()}) by slide"))
    return paths


def write_results(out_dir: str | Path, results: dict) -> Path:
    return Path(atomic_write_json(Path(out_dir) / "results.json", results) or Path(out_dir) / "results.json")
