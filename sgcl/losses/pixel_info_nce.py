"""Pixel-level InfoNCE between corresponding anchor pixels of two views (methods.md §5.1, §4.5).

Anchor ``i`` has embedding ``a_i`` in view A and ``b_i`` at the corresponding location of view B.
Positive of ``a_i``: ``b_i``. Negatives: every other sampled pixel of *both* views in the batch
(``b_j`` and ``a_j``, ``j ≠ i``). The loss is symmetric (A→B and B→A), NT-Xent style.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pixel_info_nce(za: torch.Tensor, zb: torch.Tensor, temperature: float = 0.2, normalize: bool = True) -> torch.Tensor:
    """InfoNCE over ``N`` corresponding pixel pairs ``za[i] <-> zb[i]`` (both (N, D)).

    Returns the mean over the ``2N`` anchors (both directions). ``N`` must be ≥ 2 (one pair
    has no negatives).
    """
    if za.shape != zb.shape or za.ndim != 2:
        raise ValueError(f"pixel_info_nce needs two (N, D) tensors of equal shape, got {tuple(za.shape)} and {tuple(zb.shape)}")
    n = za.shape[0]
    if n < 2:
        raise ValueError("pixel_info_nce needs at least 2 corresponding pixels (negatives come from the others)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if normalize:
        za, zb = F.normalize(za, dim=1), F.normalize(zb, dim=1)
    z = torch.cat([za, zb], 0).float()
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)
