"""Pixel-level InfoNCE between corresponding anchor pixels of two views (methods.md §5.1, §4.5).

Anchor ``i`` has embedding ``a_i`` in view A and ``b_i`` at the corresponding location of view B.
Positive of ``a_i``: ``b_i``. Negatives: every other sampled pixel of *both* views in the batch
(``b_j`` and ``a_j``, ``j ≠ i``), except pairs that share ``i``'s id when ``ids`` is given (e.g.
``(image, B cell)``: two anchors seeing the same B cell are never each other's negatives). The loss
is symmetric (A→B and B→A), NT-Xent style.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pixel_info_nce(
    za: torch.Tensor, zb: torch.Tensor, temperature: float = 0.2, normalize: bool = True, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """InfoNCE over ``N`` corresponding pixel pairs ``za[i] <-> zb[i]`` (both (N, D)).

    ``ids`` (N,) optional pair ids: rows of pairs with equal ids are removed from each other's
    negatives (their own positive is kept). Returns the mean over the ``2N`` anchors (both
    directions). ``N`` must be ≥ 2 (one pair has no negatives).
    """
    if za.shape != zb.shape or za.ndim != 2:
        raise ValueError(f"pixel_info_nce needs two (N, D) tensors of equal shape, got {tuple(za.shape)} and {tuple(zb.shape)}")
    n = za.shape[0]
    if n < 2:
        raise ValueError("pixel_info_nce needs at least 2 corresponding pixels (negatives come from the others)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if ids is not None and tuple(ids.shape) != (n,):
        raise ValueError(f"pixel_info_nce ids must have shape ({n},), got {tuple(ids.shape)}")
    if normalize:
        za, zb = F.normalize(za, dim=1), F.normalize(zb, dim=1)
    z = torch.cat([za, zb], 0).float()
    logits = z @ z.t() / temperature
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    if ids is None:
        excluded = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    else:
        both = torch.cat([ids, ids]).to(z.device)
        excluded = both[:, None] == both[None, :]
        excluded[torch.arange(2 * n, device=z.device), target] = False
    return F.cross_entropy(logits.masked_fill(excluded, float("-inf")), target)
