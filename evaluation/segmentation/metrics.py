"""Dice and IoU per class from a confusion matrix (pure functions over tensors / arrays).

Accumulate :func:`confusion_matrix` over images (it is additive), then call :func:`dice_iou`.
A class absent from both prediction and target has an undefined score (NaN) and is left out of
the means, like MONAI's ``ignore_empty=True``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

IGNORE_INDEX = 255


def confusion_matrix(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = target class, columns = predicted class.
    Pixels whose target equals ``ignore_index`` are not counted."""
    pred_t = torch.as_tensor(pred).reshape(-1).long()
    target_t = torch.as_tensor(target).reshape(-1).long()
    if pred_t.shape != target_t.shape:
        raise ValueError(f"prediction has {pred_t.numel()} pixels but the target has {target_t.numel()}")
    keep = target_t != ignore_index
    pred_t, target_t = pred_t[keep], target_t[keep]
    if target_t.numel() and int(target_t.max()) >= num_classes:
        raise ValueError(f"target contains class {int(target_t.max())} but num_classes={num_classes}")
    if pred_t.numel() and (int(pred_t.max()) >= num_classes or int(pred_t.min()) < 0):
        raise ValueError(f"prediction contains classes outside [0, {num_classes})")
    counts = torch.bincount(target_t * num_classes + pred_t, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


def dice_iou(cm: np.ndarray, exclude_background: bool = True, class_names: Sequence[str] | None = None) -> dict:
    """Per-class Dice = 2TP/(2TP+FP+FN) and IoU = TP/(TP+FP+FN), plus their means over classes
    (class 0 = background left out of the means when ``exclude_background``)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    n = cm.shape[0]
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(n)]
    first = 1 if exclude_background and n > 1 else 0

    def _mean(values: np.ndarray) -> float | None:
        vals = values[first:]
        vals = vals[~np.isnan(vals)]
        return float(vals.mean()) if vals.size else None

    def _clean(v: float) -> float | None:
        return None if np.isnan(v) else float(v)

    return {
        "dice": {names[i]: _clean(dice[i]) for i in range(n)},
        "iou": {names[i]: _clean(iou[i]) for i in range(n)},
        "mean_dice": _mean(dice),
        "mean_iou": _mean(iou),
        "pixel_accuracy": float(tp.sum() / cm.sum()) if cm.sum() else None,
        "exclude_background": bool(exclude_background),
        "pixels": int(cm.sum()),
    }


def segmentation_scores(pred, target, num_classes: int, exclude_background: bool = True,
                        ignore_index: int = IGNORE_INDEX, class_names: Sequence[str] | None = None) -> dict:
    """Dice/IoU of one prediction against one target (label maps of the same shape)."""
    return dice_iou(confusion_matrix(pred, target, num_classes, ignore_index), exclude_background, class_names)
