"""SGCL's multi-positive NCE ``L_sp`` (methods.md §1.9), on gathered index sets.

For anchor ``i`` with positives ``P_i`` and mined negatives ``H_i`` (similarities already looked
up, so nothing is B×N)::

    S⁺_i = Σ_{j∈P_i} exp(s_ij / T)      S⁻_i = Σ_{n∈H_i} exp(s_in / T)
    L_sp = -mean_i log( S⁺_i / (S⁺_i + C_i + S⁻_i) + eps )

``denominator="faithful"``: ``C_i = num_candidates − |P_i|`` (the reference masks logits before
exponentiating, so every non-positive row of the N-row bank adds exp(0) = 1);
``denominator="clean"``: ``C_i = 0``. Everything is computed in log space in fp32 (exp(1/0.07)
overflows fp16).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Denominator = Literal["faithful", "clean"]


def multi_positive_nce(
    pos_sim: torch.Tensor,
    pos_mask: torch.Tensor,
    neg_sim: torch.Tensor,
    neg_mask: torch.Tensor | None,
    temperature: float,
    denominator: Denominator = "faithful",
    num_candidates: int | torch.Tensor = 0,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Mean ``L_sp`` over anchors with at least one positive.

    ``pos_sim`` (B, P) / ``pos_mask`` (B, P) bool: cosine similarities to the positives (padded);
    ``neg_sim`` (B, K) / ``neg_mask`` (B, K) or None: to the mined negatives;
    ``num_candidates``: N of the faithful constant (bank rows, or queue + batch keys).
    """
    if denominator not in ("faithful", "clean"):
        raise ValueError(f"denominator must be 'faithful' or 'clean', got {denominator!r}")
    neg_inf = float("-inf")
    pos = (pos_sim.float() / temperature).masked_fill(~pos_mask, neg_inf)
    log_pos = torch.logsumexp(pos, dim=1)
    terms = [log_pos]
    if neg_sim.numel():
        neg = neg_sim.float() / temperature
        if neg_mask is not None:
            neg = neg.masked_fill(~neg_mask, neg_inf)
        terms.append(torch.logsumexp(neg, dim=1))
    if denominator == "faithful":
        n_pos = pos_mask.sum(1).to(log_pos.dtype)
        const = (torch.as_tensor(num_candidates, dtype=log_pos.dtype, device=log_pos.device) - n_pos).clamp_min(0)
        terms.append(torch.where(const > 0, const.log(), torch.full_like(const, neg_inf)))
    log_den = torch.logsumexp(torch.stack(terms, dim=1), dim=1)
    valid = pos_mask.any(1)
    if not bool(valid.any()):
        return pos_sim.sum() * 0.0
    ratio = torch.exp(log_pos[valid] - log_den[valid])
    return -torch.log(ratio + eps).mean() if eps > 0 else -(log_pos[valid] - log_den[valid]).mean()


def faithful_constant_share(num_candidates: int, n_pos: int, pos_sim: float, temperature: float) -> float:
    """How much of the denominator the faithful constant takes for ``n_pos`` equal positives
    (diagnostic for docs: at N = 681k, T = 0.07, one positive at s = 0.95 the constant is ~46 %)."""
    s_pos = n_pos * math.exp(pos_sim / temperature)
    const = max(num_candidates - n_pos, 0)
    return const / (s_pos + const)
