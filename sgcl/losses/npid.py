"""NPID instance term against memory-bank rows (SGCL's self-invariance, methods.md §1.4/§1.8)."""

from __future__ import annotations

import torch

from sgcl.losses.info_nce import info_nce


def npid_loss(q: torch.Tensor, bank_pos: torch.Tensor, bank_neg: torch.Tensor, tau: float, neg_weight: float = 1.0) -> torch.Tensor:
    """``CE([s(q_i, V_i), s(q_i, V_n1..nK)] / τ, 0)``: positive = the patch's own bank row
    (from earlier steps), negatives = bank rows drawn uniformly (shared by the batch, unfiltered
    as in NPID). ``q``: (B, D), ``bank_pos``: (B, D), ``bank_neg``: (K, D) or (B, K, D).
    ``neg_weight = K / K'`` when ``K'`` uniform draws stand for the reference's ``K``: the
    weighted sum has the same expectation as the sum over ``K`` draws."""
    return info_nce(q, bank_pos.detach(), bank_neg.detach(), tau, neg_weight=neg_weight)
