"""Training health: how spread out the representation is, and a warning when it collapses.

A contrastive loss can look healthy while the embedding shrinks to a point (every cosine → 1) or to
a few directions (dimensional collapse). High similarity of *positives and mined negatives* alone
says little: SGCL's semi-hard negatives are the most similar rows of the bank by design. What
tells collapse apart from hard negatives is the spread of *all* rows — the bank or queue (rows
about random pairs of patches) and the backbone features of recent batches:

- ``mean_cos``: mean cosine over distinct pairs of rows (≈ 0 for a spread-out embedding, 1 at collapse);
- ``dim_std``: per-dimension standard deviation of the L2-normalised rows, times √D (1 for rows
  spread isotropically over the sphere, 0 at collapse; ≈ √(1 − mean_cos));
- ``eff_rank``: effective rank of the centred rows (exp of the entropy of the normalised squared
  singular values; Roy & Vetterli 2007): how many directions the rows really use.

:func:`verdict` turns these into a sentence; the trainer logs the numbers every
``train.health_every`` steps as ``health/<rows>_<metric>`` and warns when the verdict changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: mean cosine of random pairs above which the rows are called collapsed (all within ~25° of one direction)
COLLAPSE_MEAN_COS = 0.9
#: effective rank below which the rows are called dimensionally collapsed
COLLAPSE_EFF_RANK = 4.0


@torch.no_grad()
def representation_spread(rows: torch.Tensor, max_rows: int = 4096) -> dict[str, float]:
    """``mean_cos``, ``dim_std``, ``eff_rank`` (and ``n``, ``dim``) of (N, D) rows (any norm;
    normalised here). Uses the first ``max_rows`` rows; needs at least 2."""
    x = rows[:max_rows].detach().float()
    n, d = x.shape
    if n < 2:
        raise ValueError(f"representation_spread needs at least 2 rows, got {n}")
    x = F.normalize(x, dim=1)
    total = x.sum(0)
    mean_cos = (float(total @ total) - n) / (n * (n - 1))  # Σ_{i≠j} x_i·x_j / (n(n−1)) without the n×n matrix
    dim_std = float(x.std(0, unbiased=False).pow(2).mean().sqrt()) * d**0.5
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s.pow(2) / s.pow(2).sum().clamp_min(1e-12)
    eff_rank = float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))
    return {"mean_cos": mean_cos, "dim_std": dim_std, "eff_rank": eff_rank, "n": n, "dim": d}


def verdict(spread: dict[str, float]) -> str | None:
    """A sentence when ``spread`` shows collapse, else None."""
    if spread["mean_cos"] >= COLLAPSE_MEAN_COS:
        return (f"collapsed: random pairs of rows have mean cosine {spread['mean_cos']:.3f} "
                f"(≥ {COLLAPSE_MEAN_COS}), per-dimension spread {spread['dim_std']:.3f} of an isotropic embedding")
    if spread["eff_rank"] < COLLAPSE_EFF_RANK:
        return (f"dimensional collapse: effective rank {spread['eff_rank']:.1f} of {spread['dim']} dimensions "
                f"(< {COLLAPSE_EFF_RANK:g}) although the mean cosine is {spread['mean_cos']:.3f}")
    return None


def hard_negative_note(pos_sim: float, neg_sim: float, mean_cos: float) -> str | None:
    """When positives and mined negatives are both far more similar than random pairs, the
    negatives are near-duplicates of the positives (too hard, likely false negatives), which is
    not collapse: say so."""
    if pos_sim > 0.9 and neg_sim > 0.9 and mean_cos < COLLAPSE_MEAN_COS:
        return (f"positives ({pos_sim:.2f}) and mined negatives ({neg_sim:.2f}) are almost equally similar to the "
                f"anchor while random pairs are at {mean_cos:.2f}: not collapse, the mined negatives are near-duplicates "
                "of the positives (lower method.sgcl.mining_frac or raise beta_a for easier negatives)")
    return None


class RecentRows:
    """The last ``capacity`` rows added under each name (a ring buffer per name, on the rows'
    device, detached). Not part of a checkpoint: diagnostics only."""

    def __init__(self, capacity: int = 4096):
        self.capacity = int(capacity)
        self._rows: dict[str, torch.Tensor] = {}
        self._next: dict[str, int] = {}
        self._full: dict[str, bool] = {}

    @torch.no_grad()
    def add(self, name: str, rows: torch.Tensor) -> None:
        rows = rows.detach()[-self.capacity:]
        buf = self._rows.get(name)
        if buf is None or buf.shape[1:] != rows.shape[1:] or buf.device != rows.device:
            dtype = torch.float32 if rows.is_floating_point() else rows.dtype
            buf = self._rows[name] = rows.new_zeros((self.capacity, *rows.shape[1:]), dtype=dtype)
            self._next[name], self._full[name] = 0, False
        i, k = self._next[name], rows.shape[0]
        end = i + k
        if end <= self.capacity:
            buf[i:end] = rows.to(buf.dtype)
        else:
            first = self.capacity - i
            buf[i:] = rows[:first].to(buf.dtype)
            buf[: k - first] = rows[first:].to(buf.dtype)
        self._full[name] |= end >= self.capacity
        self._next[name] = end % self.capacity

    def get(self, name: str) -> torch.Tensor | None:
        buf = self._rows.get(name)
        if buf is None:
            return None
        return buf if self._full[name] else buf[: self._next[name]]

    def names(self) -> list[str]:
        return list(self._rows)
