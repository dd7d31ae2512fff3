"""InfoNCE (MoCo) and NT-Xent (SimCLR) on unit-norm embeddings (methods.md §5.1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, k_pos: torch.Tensor, k_neg: torch.Tensor, tau: float, neg_mask: torch.Tensor | None = None,
             neg_weight: float = 1.0) -> torch.Tensor:
    """``-log(exp(q·k⁺/τ) / (exp(q·k⁺/τ) + w·Σ_j exp(q·k⁻_j/τ)))``, averaged over the rows of ``q``.

    ``q``, ``k_pos``: (B, D); ``k_neg``: (K, D) shared by all rows, or (B, K, D) per row.
    ``neg_mask`` (B, K) bool drops negatives (False) from the denominator. ``neg_weight`` ``w``
    multiplies every negative (K' sampled rows standing for K: ``w = K / K'``). Computed in fp32
    as ``logaddexp(l⁺, logsumexp(l⁻) + log w) − l⁺``: the query is scaled by ``1/τ`` before the
    product and the (B, K) logits are never divided, concatenated or copied.
    """
    if neg_weight <= 0:
        raise ValueError(f"neg_weight must be > 0, got {neg_weight}")
    qs = q.float() / tau
    l_pos = (qs * k_pos.float()).sum(-1)
    if k_neg.dim() == 2:
        l_neg = qs @ k_neg.float().t()
    else:
        l_neg = torch.einsum("bd,bkd->bk", qs, k_neg.float())
    if neg_mask is not None:  # a row may lose every negative: log-softmax over [l⁺, l⁻] stays finite
        logits = torch.cat([l_pos.unsqueeze(1), l_neg.masked_fill(~neg_mask, float("-inf")) + math.log(neg_weight)], 1)
        return -torch.log_softmax(logits, dim=1)[:, 0].mean()
    lse_neg = torch.logsumexp(l_neg, dim=1)
    if neg_weight != 1.0:
        lse_neg = lse_neg + math.log(neg_weight)
    return (torch.logaddexp(l_pos, lse_neg) - l_pos).mean()


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
