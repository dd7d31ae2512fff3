"""One fold's MIL training: one bag per step, class-weighted cross-entropy (plus the instance
clustering loss for ``clam_sb``), AdamW with a cosine learning-rate schedule, early stopping on the
validation loss with the best epoch's weights kept. Bags are read from disk per step
(:class:`~evaluation.mil.data.BagDataset`), so memory holds one bag at a time (two per loader worker)."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.mil.data import BagDataset, Cohort
from evaluation.mil.folds import Fold
from evaluation.mil.models import build_model


@dataclass
class TrainOptions:
    """What :func:`train_fold` needs (filled from the ``sgcl eval mil`` config)."""

    model: str = "abmil"
    model_kwargs: dict | None = None
    epochs: int = 50
    lr: float = 2e-4
    weight_decay: float = 1e-4
    min_lr_ratio: float = 0.01
    patience: int = 10
    min_epochs: int = 5
    class_weights: bool = True
    bag_weight: float = 0.7          # clam_sb: loss = bag_weight·CE + (1 − bag_weight)·instance loss
    max_patches_per_bag: int | None = None
    num_workers: int = 0
    device: str = "cpu"
    seed: int = 0
    progress: bool = False


def class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``n / (C·n_c)`` (0 for a class with no training slide)."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def cosine_lambda(total_steps: int, min_ratio: float):
    """Multiplier of the base learning rate at step ``s``: cosine from 1 to ``min_ratio``."""
    total = max(1, int(total_steps))
    return lambda s: min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))


def _loader(ds: BagDataset, shuffle: bool, workers: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    from sgcl.utils.threads import worker_init_fn

    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=shuffle, num_workers=workers, generator=g,
                                       pin_memory=False, worker_init_fn=worker_init_fn if workers > 0 else None)


@torch.no_grad()
def predict(model: torch.nn.Module, cohort: Cohort, indices: Sequence[int], device: torch.device,
            weight: torch.Tensor | None = None, workers: int = 0) -> tuple[np.ndarray, float]:
    """Class probabilities (len(indices), C) of whole bags, and the mean (weighted) cross-entropy."""
    model.eval()
    probs, losses = [], []
    for x, y, _ in _loader(BagDataset(cohort, indices), False, workers, 0):
        logits = model(x.to(device))["logits"]
        probs.append(torch.softmax(logits.float(), 0).cpu().numpy())
        losses.append(float(F.cross_entropy(logits[None], torch.tensor([y], device=device),
                                            weight=None if weight is None else weight.to(device))))
    c = len(cohort.classes)
    return (np.stack(probs) if probs else np.zeros((0, c), np.float32)), (float(np.mean(losses)) if losses else float("nan"))


def train_fold(cohort: Cohort, fold: Fold, opt: TrainOptions) -> tuple[dict, list[dict], int]:
    """Train on ``fold.train``, choose the epoch on ``fold.val``; returns (best state_dict, per-epoch
    history rows, best epoch). Without a validation split the last epoch's weights are kept."""
    from evaluation.metrics import auroc_ovr, balanced_accuracy

    device = torch.device(opt.device)
    c = len(cohort.classes)
    seed = opt.seed + 1009 * fold.fold
    torch.manual_seed(seed)
    model = build_model(opt.model, cohort.feature_dim, c, **(opt.model_kwargs or {})).to(device)
    weight = class_weights(cohort.labels[fold.train], c).to(device) if opt.class_weights else None
    optim = torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, cosine_lambda(opt.epochs * len(fold.train), opt.min_lr_ratio))
    ds = BagDataset(cohort, fold.train, opt.max_patches_per_bag, seed)
    has_val = len(fold.val) > 0
    best_state, best_loss, best_epoch, history = None, float("inf"), -1, []
    bar = range(opt.epochs)
    if opt.progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=f"fold {fold.fold}", unit="epoch", leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        ds.set_epoch(epoch)
        total = 0.0
        for x, y, _ in _loader(ds, True, opt.num_workers, seed + epoch):
            out = model(x.to(device, non_blocking=True))
            target = torch.tensor([y], device=device)
            loss = F.cross_entropy(out["logits"][None], target, weight=weight)
            if hasattr(model, "instance_loss"):
                loss = opt.bag_weight * loss + (1 - opt.bag_weight) * model.instance_loss(out, y)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            total += float(loss.detach())
        row = {"epoch": epoch, "train_loss": total / max(1, len(ds)), "lr": optim.param_groups[0]["lr"]}
        if has_val:
            proba, vloss = predict(model, cohort, fold.val, device, weight, opt.num_workers)
            yv = cohort.labels[fold.val]
            row.update({"val_loss": vloss, "val_auroc": auroc_ovr(yv, proba, c),
                        "val_balanced_accuracy": balanced_accuracy(yv, proba.argmax(1), c)})
            if vloss < best_loss:
                best_loss, best_epoch, best_state = vloss, epoch, copy.deepcopy(model.state_dict())
        row["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(row)
        if opt.progress:
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k in ("train_loss", "val_loss")})
        if has_val and epoch + 1 >= opt.min_epochs and epoch - best_epoch >= opt.patience:
            break
    if best_state is None:
        best_state, best_epoch = copy.deepcopy(model.state_dict()), history[-1]["epoch"]
    return {k: v.detach().cpu() for k, v in best_state.items()}, history, best_epoch
