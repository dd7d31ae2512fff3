"""Learning-rate schedule: linear warmup then cosine decay to ``min_lr``, evaluated per optimiser step."""

from __future__ import annotations

import math


def scaled_lr(base_lr: float, global_batch: int, scale: bool = True) -> float:
    """The linear scaling rule: ``base_lr × global_batch / 256``."""
    return base_lr * global_batch / 256.0 if scale else base_lr


def warmup_cosine(step: int, total_steps: int, peak_lr: float, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """LR at optimiser step ``step`` (0-based): ``peak·(step+1)/warmup`` during warmup, then cosine."""
    if total_steps <= 0:
        return peak_lr
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
