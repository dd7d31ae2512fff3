"""Negatives for SGCL's spatial/semantic term (methods.md §1.7).

``semi_hard`` (the reference): rank every candidate by *backbone* similarity (self and
positives excluded), keep the top ``⌈frac·N⌉`` in decreasing order, and pick ``k`` rank
positions — shared by the batch, without replacement — from a Beta(a, b) density over those
positions (Beta(5, 15) skips the hardest, likely false, negatives). ``hardest`` takes the top
``k``; ``uniform`` draws ``k`` candidates uniformly (with replacement, O(k) at any N) and masks
self/positives out.
Rank positions come from a seeded generator, so every rank (and a single process with the
whole batch) draws the same ones.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from sgcl.memory.bank import chunked_topk

Mining = Literal["semi_hard", "hardest", "uniform"]


def beta_rank_weights(length: int, a: float = 5.0, b: float = 15.0) -> torch.Tensor:
    """Probability of each of ``length`` rank positions: Beta(a, b) mass of its bin
    ``[p/length, (p+1)/length)`` (exact, via the regularised incomplete beta on a fine grid)."""
    if length <= 0:
        return torch.zeros(0, dtype=torch.float64)
    # density at bin centres integrates the bin well for length >= 100; add a fine grid otherwise
    sub = max(1, math.ceil(1000 / length))
    x = (torch.arange(length * sub, dtype=torch.float64) + 0.5) / (length * sub)
    logpdf = (a - 1) * torch.log(x) + (b - 1) * torch.log1p(-x)
    w = torch.exp(logpdf - logpdf.max()).reshape(length, sub).sum(1)
    return w / w.sum()


def sample_rank_positions(length: int, k: int, mode: Mining, a: float, b: float, generator: torch.Generator,
                          replacement: bool = False) -> torch.Tensor:
    """``min(k, length)`` distinct sorted rank positions in ``[0, length)`` (CPU int64).

    ``semi_hard``: exact Beta(a, b) bin probabilities with ``torch.multinomial`` (without
    replacement) up to 2^24 positions; beyond that (``frac·N`` of a 100M-row bank) Beta draws are
    binned and deduplicated until ``k`` distinct positions are found. ``replacement``: ``k``
    independent draws (repeats kept), so every draw follows the Beta shape even when ``k`` is a
    large share of ``length`` (a bounded mining pool).
    """
    if mode == "semi_hard" and replacement and int(k) > 0 and int(length) > 0:
        w = beta_rank_weights(int(length), a, b) if length <= 2**24 else None
        if w is not None:
            return torch.multinomial(w.float(), int(k), replacement=True, generator=generator).sort().values
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        draw = np.minimum((rng.beta(a, b, size=int(k)) * length).astype(np.int64), length - 1)
        return torch.from_numpy(np.sort(draw))
    k = min(int(k), int(length))
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    if mode == "hardest":
        return torch.arange(k)
    if mode != "semi_hard":
        raise ValueError(f"rank positions are only drawn for semi_hard/hardest, got {mode!r}")
    if length <= 2**24:
        w = beta_rank_weights(length, a, b)
        return torch.multinomial(w.float(), k, replacement=False, generator=generator).sort().values
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    picked = np.zeros(0, dtype=np.int64)
    while picked.size < k:
        draw = np.minimum((rng.beta(a, b, size=2 * k) * length).astype(np.int64), length - 1)
        picked = np.unique(np.concatenate([picked, draw]))
    picked = rng.permutation(picked)[:k]
    return torch.from_numpy(np.sort(picked))


def _is_excluded(cand: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: ``cand[b, k]`` is in row ``exclude[b]`` (−1 padded), via sorted search."""
    if exclude.numel() == 0:
        return torch.zeros_like(cand, dtype=torch.bool)
    ex = exclude.sort(dim=1).values
    pos = torch.searchsorted(ex, cand.contiguous()).clamp_max(ex.shape[1] - 1)
    return ex.gather(1, pos) == cand


@torch.no_grad()
def mine_negatives(
    query: torch.Tensor,
    keys: torch.Tensor,
    exclude: torch.Tensor,
    k: int,
    mode: Mining = "semi_hard",
    frac: float = 0.2,
    a: float = 5.0,
    b: float = 15.0,
    generator: torch.Generator | None = None,
    chunk: int = 0,
    valid: torch.Tensor | None = None,
    pool: int = 0,
    replacement: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative indices into ``keys`` for each row of ``query``.

    ``query`` (B, F) and ``keys`` (N, F) are the unit-norm features used for *ranking* (SGCL:
    backbone features and the backbone bank). ``exclude`` (B, E) int64 (−1 padded): self and
    positives. ``valid`` (N,) bool marks usable keys (e.g. filled queue slots).
    ``pool > 0``: rank within ``pool`` rows drawn uniformly (shared by the batch) instead of all N,
    so time and memory stay bounded at 50M rows; the rank positions keep the same Beta shape
    over the pool's top ``⌈frac·pool⌉``, i.e. the same similarity quantiles in expectation.
    ``replacement``: semi-hard rank positions are ``k`` independent Beta draws (repeated negatives
    count once per draw), which keeps the Beta shape when ``k`` approaches ``⌈frac·pool⌉``.
    Returns ``(index (B, k'), mask (B, k'))``; masked entries are not negatives.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if pool > 0 and pool < keys.shape[0] and mode != "uniform":
        return _mine_in_pool(query, keys, exclude, k, mode, frac, a, b, gen, chunk, valid, pool, replacement)
    n = keys.shape[0]
    device = query.device
    if valid is not None:
        bad = (~valid).nonzero(as_tuple=True)[0]
        if bad.numel():
            exclude = torch.cat([exclude, bad.unsqueeze(0).expand(query.shape[0], -1).to(exclude.device)], 1)
    if mode == "uniform":
        kk = min(int(k), n)
        cand = torch.randint(0, n, (kk,), generator=gen).to(device).unsqueeze(0).expand(query.shape[0], -1).contiguous()
        return cand, ~_is_excluded(cand, exclude.to(device))
    length = max(1, math.ceil(frac * n)) if mode == "semi_hard" else min(int(k), n)
    positions = sample_rank_positions(length, k, mode, a, b, gen, replacement).to(device)
    if positions.numel() == 0:
        empty = torch.zeros(query.shape[0], 0, dtype=torch.long, device=device)
        return empty, empty.bool()
    top_v, top_i = chunked_topk(query, keys, int(positions[-1]) + 1, chunk=chunk, exclude=exclude.to(device))
    positions = positions[positions < top_i.shape[1]]
    idx = top_i[:, positions]
    mask = torch.isfinite(top_v[:, positions])
    return idx, mask


def draw_pool(n: int, pool: int, generator: torch.Generator, device: torch.device | str | None = None) -> torch.Tensor:
    """``pool`` uniform draws over ``[0, n)``, sorted and deduplicated (the rows a pooled step ranks)."""
    return torch.randint(0, n, (int(pool),), generator=generator).unique().to(device)


def local_exclude(rows: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """``exclude`` (global indices, −1 padded) as positions in the sorted ``rows`` (−1 where absent)."""
    ex = exclude.to(rows.device)
    pos = torch.searchsorted(rows, ex.clamp_min(0)).clamp_max(rows.numel() - 1)
    return torch.where((ex >= 0) & (rows[pos] == ex), pos, torch.full_like(ex, -1))


def mine_in_pool(query, keys, exclude, k, mode, frac, a, b, gen, chunk=0, valid=None, pool=0, replacement=False):
    """:func:`mine_negatives` within ``pool`` uniform rows of ``keys`` shared by the batch. Returns
    ``(rows (P,), local index (B, k'), mask (B, k'))``: the mined negatives are ``rows[local]`` (callers
    that score the whole pool once keep ``rows`` and ``local``)."""
    rows = draw_pool(keys.shape[0], pool, gen, query.device)
    sub_valid = None if valid is None else valid.to(query.device)[rows]
    local, mask = mine_negatives(query, keys.index_select(0, rows), local_exclude(rows, exclude), k, mode, frac, a, b, gen,
                                 chunk, sub_valid, pool=0, replacement=replacement)
    return rows, local, mask


def _mine_in_pool(query, keys, exclude, k, mode, frac, a, b, gen, chunk, valid, pool, replacement):
    rows, local, mask = mine_in_pool(query, keys, exclude, k, mode, frac, a, b, gen, chunk, valid, pool, replacement)
    return rows[local], mask
