"""ARCO stratified group sampling (methods.md §3): SG and its antithetic variant SAG.

``stratified_group_sample(M, n, g, antithetic, mode, coords, generator)`` picks ``n`` of ``M``
candidates (indices, with replacement, as the reference does).

- ``mode="virtual"`` reproduces the reference code: indices ``0..e²−1`` (``e = round(√M)``) on a
  virtual ``e × e`` row-major grid, ``g × g`` blocks of edge ``⌊e/g⌋`` (the last row/column of
  blocks absorbs the remainder), quota ``m = ⌊n·e²/M⌋ // g²`` per block, uniform draws with
  replacement inside each block; SAG draws ``m // 2`` per block and adds each draw's point
  reflection through the block centre. Indices ≥ M are dropped, the rest shuffled and padded with
  uniform draws to ``n``. If the grid is degenerate (``⌊e/g⌋ = 0``) it falls back to the 1-D
  sampler (blocks of 16 consecutive indices; plain uniform when ``M < 16`` or ``M/16 > n``).
- ``mode="spatial"`` is the paper's intent: strata are the ``g × g`` cells of the candidates'
  image coordinates (``coords`` (M, 2) = (y, x) or (M, 3) = (b, y, x), cells per image ``b``),
  per-cell quota ∝ its candidate count (largest-remainder rounding, ties broken at random, so the
  quotas sum to exactly ``n``); the SAG partner of a draw is the candidate of the same cell nearest
  to its point reflection through the cell's centre. Coordinates are integer pixel indices: with
  ``extent`` (H, W) the cell of row ``y`` is ``⌊y·g/H⌋`` and the reflection of row ``y`` in a cell
  spanning rows ``[a, b)`` is ``a + b − 1 − y``.

``stratified_group_draw`` returns the draws with their stratum and antithetic partner before
shuffling/padding, for inspection and tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

FALLBACK_BLOCK = 16


@dataclass
class GroupDraw:
    """Stratified draws before shuffling and padding.

    ``index`` (K,) candidate indices (virtual mode may hold indices ≥ M, which the sampler drops);
    ``stratum`` (K,) stratum id of each draw; ``partner`` (K,) position in ``index`` of the draw's
    antithetic partner, or −1; ``quota`` (S,) the planned number of draws per stratum;
    ``kind``: ``"grid"``, ``"1d"``, ``"uniform"`` or ``"spatial"``.
    """

    index: torch.Tensor
    stratum: torch.Tensor
    partner: torch.Tensor
    quota: torch.Tensor
    kind: str


def _empty(kind: str, strata: int = 0) -> GroupDraw:
    z = torch.zeros(0, dtype=torch.long)
    return GroupDraw(z, z.clone(), z.clone(), torch.zeros(strata, dtype=torch.long), kind)


def _pack(parts: list[tuple[torch.Tensor, torch.Tensor | None]], quota: list[int], kind: str) -> GroupDraw:
    """``parts``: per stratum (draws, partners-or-None); partners are paired with draws 1:1."""
    idx, strat, partner = [], [], []
    pos = 0
    for s, (u, v) in enumerate(parts):
        k = u.numel()
        idx.append(u)
        strat.append(torch.full((k,), s, dtype=torch.long))
        if v is None:
            partner.append(torch.full((k,), -1, dtype=torch.long))
            pos += k
        else:
            idx.append(v)
            strat.append(torch.full((k,), s, dtype=torch.long))
            ar = torch.arange(k)
            partner.append(pos + k + ar)
            partner.append(pos + ar)
            pos += 2 * k
    if not idx:
        return _empty(kind, len(quota))
    return GroupDraw(torch.cat(idx), torch.cat(strat), torch.cat(partner), torch.tensor(quota, dtype=torch.long), kind)


def _randint(low: int, high: int, k: int, gen: torch.Generator | None) -> torch.Tensor:
    return torch.randint(low, high, (k,), generator=gen)


def _virtual_draw(M: int, n: int, g: int, antithetic: bool, gen: torch.Generator | None) -> GroupDraw:
    e = int(round(math.sqrt(M)))
    p = e // g
    if p == 0:
        return _fallback_draw(M, n, antithetic, gen)
    m = (n * e * e // M) // (g * g)
    per = m // 2 if antithetic else m
    parts, quota = [], []
    for bi in range(g):
        r0, r1 = bi * p, (e if bi == g - 1 else (bi + 1) * p)
        for bj in range(g):
            c0, c1 = bj * p, (e if bj == g - 1 else (bj + 1) * p)
            r = _randint(r0, r1, per, gen)
            c = _randint(c0, c1, per, gen)
            u = r * e + c
            v = (r0 + r1 - 1 - r) * e + (c0 + c1 - 1 - c) if antithetic else None
            parts.append((u, v))
            quota.append(2 * per if antithetic else per)
    return _pack(parts, quota, "grid")


def _fallback_draw(M: int, n: int, antithetic: bool, gen: torch.Generator | None) -> GroupDraw:
    """The reference's 1-D sampler: blocks of 16 consecutive indices."""
    p = FALLBACK_BLOCK
    if M < p or M / p > n:
        return _empty("uniform")
    blocks = M // p
    q = n // blocks
    per = q // 2 if antithetic else q
    parts, quota = [], []
    for k in range(blocks):
        u = _randint(k * p, (k + 1) * p, per, gen)
        v = (2 * k + 1) * p - 1 - u if antithetic else None
        parts.append((u, v))
        quota.append(2 * per if antithetic else per)
    return _pack(parts, quota, "1d")


def _largest_remainder(counts: torch.Tensor, n: int, gen: torch.Generator | None) -> torch.Tensor:
    """Integer quotas ∝ ``counts`` summing to ``n`` (ties in the remainders broken at random)."""
    exact = counts.double() * n / counts.sum()
    base = torch.floor(exact).long()
    rest = n - int(base.sum())
    if rest > 0:
        frac = exact - base
        jitter = torch.rand(frac.shape, generator=gen, dtype=torch.float64) * 1e-9
        base[torch.argsort(frac + jitter, descending=True)[:rest]] += 1
    return base


def _spatial_draw(
    coords: torch.Tensor, n: int, g: int, antithetic: bool, gen: torch.Generator | None, extent: tuple[float, float] | None
) -> GroupDraw:
    coords = torch.as_tensor(coords)
    if coords.ndim != 2 or coords.shape[1] not in (2, 3):
        raise ValueError(f"spatial stratified sampling needs coords of shape (M, 2) = (y, x) or (M, 3) = (b, y, x), got {tuple(coords.shape)}")
    M = coords.shape[0]
    yx = coords[:, -2:].double()
    b = coords[:, 0].long() if coords.shape[1] == 3 else torch.zeros(M, dtype=torch.long)
    if extent is None:
        lo = yx.min(0).values
        hi = yx.max(0).values + 1
    else:
        lo = torch.zeros(2, dtype=torch.float64)
        hi = torch.tensor(extent, dtype=torch.float64)
    size = (hi - lo).clamp_min(1e-9) / g
    cell = torch.clamp(torch.floor((yx - lo) / size), 0, g - 1).long()
    stratum_of = (b - b.min()) * g * g + cell[:, 0] * g + cell[:, 1]
    ids, inverse, counts = torch.unique(stratum_of, return_inverse=True, return_counts=True)
    quota = _largest_remainder(counts, n, gen)
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    parts, plan = [], []
    for s in range(ids.numel()):
        members = order[starts[s] : starts[s] + counts[s]]
        q = int(quota[s])
        plan.append(q)
        if not antithetic:
            parts.append((members[_randint(0, members.numel(), q, gen)], None))
            continue
        u = members[_randint(0, members.numel(), q // 2, gen)]
        c = cell[members[0]]
        centre = lo + (c.double() + 0.5) * size - 0.5  # coords are pixel indices: cell [a, b) has centre (a + b - 1) / 2
        target = 2 * centre - yx[u]
        nearest = torch.cdist(target[None], yx[members][None])[0].argmin(1)
        parts.append((u, members[nearest]))
        if q % 2:  # odd quota: one unpaired draw keeps the cell's count exact
            parts.append((members[_randint(0, members.numel(), 1, gen)], None))
    draw = _pack(parts, plan, "spatial")
    if antithetic:  # unpaired extras were packed as separate "strata"; map them back to their cell
        stratum = []
        for s in range(ids.numel()):
            q = int(quota[s])
            stratum += [s] * (2 * (q // 2)) + [s] * (q % 2)
        draw.stratum = torch.tensor(stratum, dtype=torch.long)
    return draw


def stratified_group_draw(
    M: int,
    n: int,
    g: int = 4,
    antithetic: bool = False,
    mode: Literal["virtual", "spatial"] = "virtual",
    coords: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    extent: tuple[float, float] | None = None,
) -> GroupDraw:
    """The stratified part of :func:`stratified_group_sample` (no shuffling, no padding)."""
    if M < 1:
        raise ValueError(f"stratified sampling needs at least one candidate (M={M})")
    if n < 0 or g < 1:
        raise ValueError(f"stratified sampling needs n >= 0 and g >= 1 (n={n}, g={g})")
    if mode == "virtual":
        return _virtual_draw(M, n, g, antithetic, generator)
    if mode == "spatial":
        if coords is None or len(coords) != M:
            raise ValueError(f"mode='spatial' needs coords for all M={M} candidates")
        return _spatial_draw(coords, n, g, antithetic, generator, extent)
    raise ValueError(f"unknown stratified sampling mode {mode!r}; use 'virtual' or 'spatial'")


def stratified_group_sample(
    M: int,
    n: int,
    g: int = 4,
    antithetic: bool = False,
    mode: Literal["virtual", "spatial"] = "virtual",
    coords: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    extent: tuple[float, float] | None = None,
) -> torch.Tensor:
    """``n`` candidate indices in ``[0, M)`` (LongTensor), SG (``antithetic=False``) or SAG.

    ``extent`` = (height, width) of the image in spatial mode (cells are ``g × g`` of it); by
    default the bounding box of ``coords``.
    """
    draw = stratified_group_draw(M, n, g, antithetic, mode, coords, generator, extent)
    idx = draw.index[draw.index < M]
    idx = idx[torch.randperm(idx.numel(), generator=generator)]
    if idx.numel() < n:
        idx = torch.cat([idx, _randint(0, M, n - idx.numel(), generator)])
    return idx[:n]


def uniform_sample(M: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The baseline: ``n`` uniform draws with replacement from ``[0, M)``."""
    return _randint(0, M, n, generator)
