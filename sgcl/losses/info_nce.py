"""InfoNCE (MoCo) and NT-Xent (SimCLR) on unit-norm embeddings (methods.md §5.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, k_pos: torch.Tensor, k_neg: torch.Tensor, tau: float, neg_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``-log(exp(q·k⁺/τ) / (exp(q·k⁺/τ) + Σ_j exp(q·k⁻_j/τ)))``, averaged over the rows of ``q``.

    ``q``, ``k_pos``: (B, D); ``k_neg``: (K, D) shared by all rows, or (B, K, D) per row.
    ``neg_mask`` (B, K) bool drops negatives (False) from the denominator. Computed in fp32.
    """
    q = q.float()
    l_pos = (q * k_pos.float()).sum(-1, keepdim=True)
    if k_neg.dim() == 2:
        l_neg = q @ k_neg.float().t()
    else:
        l_neg = torch.einsum("bd,bkd->bk", q, k_neg.float())
    logits = torch.cat([l_pos, l_neg], dim=1) / tau
    if neg_mask is not None:
        logits[:, 1:] = logits[:, 1:].masked_fill(~neg_mask, float("-inf"))
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)


def nt_xent(anchors: torch.Tensor, candidates: torch.Tensor, pos_index: torch.Tensor, self_index: torch.Tensor, tau: float) -> torch.Tensor:
    """NT-Xent: each anchor's positive is ``candidates[pos_index]``; its own row
    ``candidates[self_index]`` (−1 for none) is removed; every other candidate is a negative.

    Anchors (A, D) are this rank's embeddings of both views, candidates (M, D) those of every
    rank (``gather_with_grad``): the mean over local anchors, averaged by DDP, equals the loss
    of one process over the whole batch.
    """
    logits = anchors.float() @ candidates.float().t() / tau
    rows = torch.arange(anchors.shape[0], device=anchors.device)
    has_self = self_index >= 0
    logits[rows[has_self], self_index[has_self]] = float("-inf")
    return F.cross_entropy(logits, pos_index)
