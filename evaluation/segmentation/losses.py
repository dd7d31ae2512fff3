"""Soft Dice (+ cross-entropy) for segmentation, per methods.md §5.5.

``D_c = (2 Σ p·y + ε) / (Σ p + Σ y + ε)`` over pixels (and the batch when ``batch_dice``),
``L_dice = 1 − mean_c D_c``; ``squared=True`` gives the V-Net variant (``Σ p² + Σ y²``).
For sparse foreground (nuclei) exclude the background from the mean and add CE.
Pixels labelled ``ignore_index`` count in neither term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import IGNORE_INDEX


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, exclude_background: bool = True,
                   batch_dice: bool = True, squared: bool = False, eps: float = 1e-5,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Soft Dice loss of ``logits`` (B, C, H, W) against class indices ``target`` (B, H, W)."""
    if logits.ndim != 4 or target.ndim != 3 or logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match (B,C,H,W)/(B,H,W)")
    num_classes = logits.shape[1]
    probs = logits.float().softmax(1)
    valid = (target != ignore_index).unsqueeze(1).to(probs.dtype)
    onehot = F.one_hot(target.clamp(0, num_classes - 1).long(), num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    probs, onehot = probs * valid, onehot * valid
    dims = (0, 2, 3) if batch_dice else (2, 3)
    inter = (probs * onehot).sum(dims)
    denom = (probs.pow(2).sum(dims) + onehot.pow(2).sum(dims)) if squared else (probs.sum(dims) + onehot.sum(dims))
    dice = (2 * inter + eps) / (denom + eps)
    if exclude_background and num_classes > 1:
        dice = dice[..., 1:]
    return 1 - dice.mean()


class DiceCELoss(nn.Module):
    """``dice_weight · soft Dice + ce_weight · cross-entropy`` (methods.md §2.2: Dice + 0.5·CE)."""

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 0.5, exclude_background: bool = True,
                 batch_dice: bool = True, squared: bool = False, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        if dice_weight < 0 or ce_weight < 0 or dice_weight + ce_weight == 0:
            raise ValueError("dice_weight and ce_weight must be >= 0 and not both 0")
        self.dice_weight, self.ce_weight = dice_weight, ce_weight
        self.exclude_background, self.batch_dice, self.squared = exclude_background, batch_dice, squared
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(
                logits, target, self.exclude_background, self.batch_dice, self.squared, ignore_index=self.ignore_index)
        if self.ce_weight and (target != self.ignore_index).any():
            loss = loss + self.ce_weight * F.cross_entropy(logits.float(), target.long(), ignore_index=self.ignore_index)
        return loss
