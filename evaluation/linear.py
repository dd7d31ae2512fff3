"""Linear probe and few-shot evaluation on frozen features (pure functions over tensors).

The classifier is multinomial logistic regression fitted full-batch with L-BFGS (as UNI's probe):
loss = cross-entropy + ``l2`` * ||W||² / 2. The L2 strength is chosen on a validation split from a
sweep (log grid, lgssl-style), by balanced accuracy; the chosen model is refitted on train+val.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.metrics import balanced_accuracy, classification_metrics

Normalize = Literal["none", "standard", "l2"]
DEFAULT_L2_GRID = tuple(float(x) for x in np.logspace(-6, 2, 9))


@dataclass
class LogisticModel:
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor    # (C,)
    mean: torch.Tensor    # (D,) feature centring applied before the linear layer
    scale: torch.Tensor   # (D,)
    normalize: str = "standard"

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x).float()
        if self.normalize == "l2":
            x = F.normalize(x, dim=1)
        return (x - self.mean) / self.scale

    def predict_proba(self, x) -> torch.Tensor:
        x = self._prep(x)
        if x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"feature dimension {x.shape[1]} does not match the probe's {self.weight.shape[1]}")
        return torch.softmax(x @ self.weight.T + self.bias, dim=1)

    def predict(self, x) -> torch.Tensor:
        return self.predict_proba(x).argmax(1)


def _stats(x: torch.Tensor, normalize: Normalize) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.shape[1]
    if normalize == "standard":
        return x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    if normalize == "l2":
        x = F.normalize(x, dim=1)
        return x.mean(0), torch.ones(d)
    if normalize == "none":
        return torch.zeros(d), torch.ones(d)
    raise ValueError(f"unknown normalize {normalize!r}; choose none, standard or l2")


def fit_logistic(features, labels, num_classes: int, l2: float = 1e-4, normalize: Normalize = "standard",
                 max_iter: int = 500) -> LogisticModel:
    """Fit multinomial logistic regression with L-BFGS (strong Wolfe line search), deterministic."""
    x = torch.as_tensor(features).float()
    y = torch.as_tensor(labels).long()
    if x.shape[0] == 0:
        raise ValueError("cannot fit a linear probe on an empty training split")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} features but {y.shape[0]} labels")
    mean, scale = _stats(x, normalize)
    model = LogisticModel(torch.zeros(num_classes, x.shape[1]), torch.zeros(num_classes), mean, scale, normalize)
    xn = model._prep(x).double()
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xn @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    model.weight, model.bias = w.detach().float(), b.detach().float()
    return model


def linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, num_classes: int,
                 l2_grid: Sequence[float] = DEFAULT_L2_GRID, normalize: Normalize = "standard",
                 max_iter: int = 500, refit_on_trainval: bool = True) -> dict:
    """Sweep ``l2_grid`` on the validation split (balanced accuracy, ties → stronger regularisation),
    refit on train+val, and evaluate on test. Returns the chosen ``l2``, the sweep, test predictions
    and probabilities, and test metrics."""
    for name, x in (("train", train_x), ("validation", val_x), ("test", test_x)):
        if len(x) == 0:
            raise ValueError(f"the {name} split is empty; the linear probe needs train, validation and test items")
    dims = {torch.as_tensor(x).shape[1] for x in (train_x, val_x, test_x)}
    if len(dims) != 1:
        raise ValueError(f"feature dimensions differ between splits: {sorted(dims)}")
    sweep = []
    for l2 in sorted(l2_grid):
        m = fit_logistic(train_x, train_y, num_classes, l2, normalize, max_iter)
        score = balanced_accuracy(val_y, m.predict(val_x), num_classes)
        sweep.append({"l2": float(l2), "val_balanced_accuracy": score})
    best = max(sweep, key=lambda r: (r["val_balanced_accuracy"], r["l2"]))
    if refit_on_trainval:
        fx = torch.cat([torch.as_tensor(train_x).float(), torch.as_tensor(val_x).float()])
        fy = torch.cat([torch.as_tensor(train_y).long(), torch.as_tensor(val_y).long()])
    else:
        fx, fy = train_x, train_y
    model = fit_logistic(fx, fy, num_classes, best["l2"], normalize, max_iter)
    proba = model.predict_proba(test_x)
    pred = proba.argmax(1)
    return {"l2": best["l2"], "sweep": sweep, "model": model, "pred": pred, "proba": proba,
            "metrics": classification_metrics(test_y, pred, num_classes, proba)}


def sample_few_shot(labels, shots: int, seed: int, num_classes: int) -> np.ndarray:
    """Indices of ``shots`` items per class (all of a class when it has fewer), seeded."""
    y = np.asarray(torch.as_tensor(labels).long())
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        if idx.size == 0:
            continue
        picked.append(rng.choice(idx, size=min(shots, idx.size), replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def few_shot(train_x, train_y, test_x, test_y, num_classes: int, shots: Sequence[int] = (1, 2, 4, 8, 16),
             seeds: Sequence[int] = (0, 1, 2, 3, 4), l2: float = 1e-2, normalize: Normalize = "standard",
             max_iter: int = 300) -> dict:
    """Logistic regression on ``k`` labelled items per class, repeated over ``seeds``.
    Returns ``{"runs": [...], "summary": {k: {metric: {"mean", "std"}}}}``."""
    if len(test_x) == 0:
        raise ValueError("the test split is empty")
    train_x = torch.as_tensor(train_x).float()
    train_y = torch.as_tensor(train_y).long()
    runs = []
    for k in shots:
        for seed in seeds:
            idx = torch.as_tensor(sample_few_shot(train_y, int(k), int(seed), num_classes))
            model = fit_logistic(train_x[idx], train_y[idx], num_classes, l2, normalize, max_iter)
            proba = model.predict_proba(test_x)
            m = classification_metrics(test_y, proba.argmax(1), num_classes, proba)
            runs.append({"shots": int(k), "seed": int(seed), "n_train": int(idx.numel()), **m})
    summary: dict[int, dict[str, dict[str, float]]] = {}
    for k in shots:
        rows = [r for r in runs if r["shots"] == int(k)]
        summary[int(k)] = {
            name: {"mean": float(np.nanmean([r[name] for r in rows])), "std": float(np.nanstd([r[name] for r in rows]))}
            for name in rows[0] if name not in ("shots", "seed", "n_train")
        }
    return {"runs": runs, "summary": summary}
