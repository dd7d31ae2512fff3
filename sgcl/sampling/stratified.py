"""ARCO stratified group sampling (methods.md §3): SG and its antithetic variant SAG.

``stratified_group_sample(M, n, g, antithetic, mode, coords, generator, extent, replacement)`` picks
``n`` of ``M`` candidates.

- ``mode="virtual"`` is the reference code's layout: indices ``0..e²−1`` (``e = round(√M)``) on a
  virtual ``e × e`` row-major grid, ``g × g`` blocks of edge ``⌊e/g⌋`` (the last row/column of
  blocks absorbs the remainder), quota ``m = ⌊n·e²/M⌋ // g²`` per block; SAG draws ``m // 2`` per
  block and pairs each draw with its point reflection through the block centre. If the grid is
  degenerate (``⌊e/g⌋ = 0``) it falls back to the 1-D sampler (blocks of 16 consecutive indices,
  ``n // blocks`` each; plain uniform when ``M < 16`` or ``M/16 > n``).
- ``mode="spatial"`` is the paper's intent: strata are the ``g × g`` cells of the candidates'
  image coordinates (``coords`` (M, 2) = (y, x) or (M, 3) = (b, y, x), cells per image ``b``),
  per-cell quota ∝ its candidate count (largest-remainder rounding, ties broken at random, so the
  quotas sum to exactly ``n``); the SAG partner of a draw is the candidate of the same cell nearest
  to its point reflection through the cell's centre (an odd quota adds one unpaired draw).
  Coordinates are integer pixel indices: with ``extent`` (H, W) the cell of row ``y`` is
  ``⌊y·g/H⌋`` and the reflection of row ``y`` in a cell spanning rows ``[a, b)`` is ``a + b − 1 − y``.

``replacement=True`` is the reference code (methods.md §3.2–3.3): draws with replacement inside each
stratum; virtual blocks span indices ``≥ M``, whose draws are dropped; the rest is shuffled and padded
with uniform draws to ``n``. ``replacement=False`` returns exactly ``min(n, M)`` distinct indices:
each stratum's quota is capped at its size (virtual blocks hold only indices ``< M``), draws inside a
stratum are distinct, a SAG draw is paired with the *unused* candidate of its stratum nearest to its
reflection, and the shortfall is topped up uniformly from the unused candidates.

``stratified_group_draw`` returns the draws with their stratum and antithetic partner before
shuffling/padding, for inspection and tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

FALLBACK_BLOCK = 16


@dataclass
class GroupDraw:
    """Stratified draws before shuffling and padding.

    ``index`` (K,) candidate indices (virtual mode with replacement may hold indices ≥ M, which the
    sampler drops); ``stratum`` (K,) stratum id of each draw; ``partner`` (K,) position in ``index``
    of the draw's antithetic partner, or −1; ``quota`` (S,) the planned number of draws per stratum;
    ``kind``: ``"grid"``, ``"1d"``, ``"uniform"`` or ``"spatial"``.
    """

    index: torch.Tensor
    stratum: torch.Tensor
    partner: torch.Tensor
    quota: torch.Tensor
    kind: str


@dataclass
class _Stratum:
    """Candidates of one stratum: their indices (k,), positions (k, d) and the stratum's centre (d,)."""

    members: np.ndarray
    pos: np.ndarray
    centre: np.ndarray


def _randint(low: int, high: int, k: int, gen: torch.Generator | None) -> torch.Tensor:
    return torch.randint(low, high, (k,), generator=gen)


def _partners(pairs: int, singles: int) -> np.ndarray:
    """Partner positions for the per-stratum layout ``[u_1..u_p, v_1..v_p, singles]``."""
    ar = np.arange(pairs)
    return np.concatenate([ar + pairs, ar, np.full(singles, -1)])


def _draw_with_replacement(s: _Stratum, q: int, antithetic: bool, uniform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``q`` draws from ``uniform`` (q values in [0, 1)); a SAG draw's partner is the member nearest
    to its reflection (exact on the virtual grid)."""
    k, pairs = s.members.size, (q // 2 if antithetic else 0)
    pick = np.minimum((uniform * k).astype(np.int64), k - 1)
    u, single = pick[:pairs], pick[pairs : q - pairs]  # pairs draws, then q − 2·pairs unpaired ones
    target = 2 * s.centre - s.pos[u]
    v = ((s.pos[None] - target[:, None]) ** 2).sum(-1).argmin(1)
    return s.members[np.concatenate([u, v, single])], _partners(pairs, single.size)


def _draw_without_replacement(s: _Stratum, q: int, antithetic: bool, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``q`` distinct members in the order of their random ``key``; a SAG draw's partner is the
    unused member nearest to its reflection."""
    order = iter(np.argsort(key, kind="stable").tolist())
    pairs = q // 2 if antithetic else 0
    used = np.zeros(s.members.size, dtype=bool)

    def next_unused() -> int:
        i = next(j for j in order if not used[j])
        used[i] = True
        return i

    u, v = [], []
    for _ in range(pairs):
        u.append(next_unused())
        dist = ((s.pos - (2 * s.centre - s.pos[u[-1]])) ** 2).sum(1)
        dist[used] = np.inf
        v.append(int(np.argmin(dist)))
        used[v[-1]] = True
    single = [next_unused() for _ in range(q - 2 * pairs)]
    return s.members[np.array(u + v + single, dtype=np.int64)], _partners(pairs, len(single))


def _draw(strata: list[_Stratum], quota: list[int], antithetic: bool, replacement: bool, kind: str,
          gen: torch.Generator | None) -> GroupDraw:
    """Draw ``quota[s]`` from every stratum (capped at its size without replacement) and pack them.
    The random numbers come from ``gen`` in one call."""
    sizes = [s.members.size for s in strata]
    if not replacement:
        quota = [min(q, k) for q, k in zip(quota, sizes)]
    rand = torch.rand(sum(quota if replacement else sizes), generator=gen, dtype=torch.float64).numpy()
    idx, strat, partner, pos, off = [], [], [], 0, 0
    for s, (stratum, q, k) in enumerate(zip(strata, quota, sizes)):
        step = q if replacement else k
        fn = _draw_with_replacement if replacement else _draw_without_replacement
        u, p = fn(stratum, q, antithetic, rand[off : off + step])
        off += step
        idx.append(u)
        strat.append(np.full(u.size, s))
        partner.append(np.where(p >= 0, p + pos, p))
        pos += u.size

    def cat(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts).astype(np.int64)) if parts else torch.zeros(0, dtype=torch.long)

    return GroupDraw(cat(idx), cat(strat), cat(partner), torch.tensor(quota, dtype=torch.long), kind)


def _rect_stratum(rows: tuple[int, int], cols: tuple[int, int], width: int, limit: int | None) -> _Stratum:
    """Indices ``r·width + c`` of a block of the virtual grid (only those ``< limit`` when given)."""
    r, c = np.meshgrid(np.arange(*rows), np.arange(*cols), indexing="ij")
    pos = np.stack([r.ravel(), c.ravel()], 1)
    members = pos[:, 0] * width + pos[:, 1]
    if limit is not None:
        keep = members < limit
        members, pos = members[keep], pos[keep]
    centre = np.array([(rows[0] + rows[1] - 1) / 2, (cols[0] + cols[1] - 1) / 2])
    return _Stratum(members, pos.astype(np.float64), centre)


def _virtual_draw(M: int, n: int, g: int, antithetic: bool, replacement: bool, gen: torch.Generator | None) -> GroupDraw:
    e = int(round(math.sqrt(M)))
    p = e // g
    if p == 0:
        return _fallback_draw(M, n, antithetic, replacement, gen)
    m = (n * e * e // M) // (g * g)
    q = 2 * (m // 2) if antithetic else m
    edges = [(b * p, e if b == g - 1 else (b + 1) * p) for b in range(g)]
    limit = None if replacement else M
    strata = [_rect_stratum(rows, cols, e, limit) for rows in edges for cols in edges]
    return _draw(strata, [q] * len(strata), antithetic, replacement, "grid", gen)


def _fallback_draw(M: int, n: int, antithetic: bool, replacement: bool, gen: torch.Generator | None) -> GroupDraw:
    """The reference's 1-D sampler: blocks of 16 consecutive indices."""
    p = FALLBACK_BLOCK
    if M < p or M / p > n:
        return _draw([], [], antithetic, replacement, "uniform", gen)
    blocks = M // p
    q = n // blocks
    q = 2 * (q // 2) if antithetic else q
    strata = [_rect_stratum((0, 1), (k * p, (k + 1) * p), 0, None) for k in range(blocks)]
    return _draw(strata, [q] * blocks, antithetic, replacement, "1d", gen)


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


def _spatial_draw(coords: torch.Tensor, n: int, g: int, antithetic: bool, replacement: bool, gen: torch.Generator | None,
                  extent: tuple[float, float] | None) -> GroupDraw:
    coords = torch.as_tensor(coords)
    if coords.ndim != 2 or coords.shape[1] not in (2, 3):
        raise ValueError(f"spatial stratified sampling needs coords of shape (M, 2) = (y, x) or (M, 3) = (b, y, x), got {tuple(coords.shape)}")
    M = coords.shape[0]
    yx = coords[:, -2:].double()
    b = coords[:, 0].long() if coords.shape[1] == 3 else torch.zeros(M, dtype=torch.long)
    if extent is None:
        lo, hi = yx.min(0).values, yx.max(0).values + 1
    else:
        lo, hi = torch.zeros(2, dtype=torch.float64), torch.tensor(extent, dtype=torch.float64)
    size = (hi - lo).clamp_min(1e-9) / g
    cell = torch.clamp(torch.floor((yx - lo) / size), 0, g - 1).long()
    stratum_of = (b - b.min()) * g * g + cell[:, 0] * g + cell[:, 1]
    ids, inverse, counts = torch.unique(stratum_of, return_inverse=True, return_counts=True)
    quota = _largest_remainder(counts, n if replacement else min(n, M), gen)
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    centres = (lo + (cell.double() + 0.5) * size - 0.5).numpy()  # pixel indices: cell [a, b) has centre (a + b - 1) / 2
    order, yx = order.numpy(), yx.numpy()
    strata = []
    for s0, c in zip(starts.tolist(), counts.tolist()):
        members = order[s0 : s0 + c]
        strata.append(_Stratum(members, yx[members], centres[members[0]]))
    return _draw(strata, quota.tolist(), antithetic, replacement, "spatial", gen)


def stratified_group_draw(
    M: int,
    n: int,
    g: int = 4,
    antithetic: bool = False,
    mode: Literal["virtual", "spatial"] = "virtual",
    coords: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    extent: tuple[float, float] | None = None,
    replacement: bool = True,
) -> GroupDraw:
    """The stratified part of :func:`stratified_group_sample` (no shuffling, no padding)."""
    if M < 1:
        raise ValueError(f"stratified sampling needs at least one candidate (M={M})")
    if n < 0 or g < 1:
        raise ValueError(f"stratified sampling needs n >= 0 and g >= 1 (n={n}, g={g})")
    if mode == "virtual":
        return _virtual_draw(M, n, g, antithetic, replacement, generator)
    if mode == "spatial":
        if coords is None or len(coords) != M:
            raise ValueError(f"mode='spatial' needs coords for all M={M} candidates")
        return _spatial_draw(coords, n, g, antithetic, replacement, generator, extent)
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
    replacement: bool = True,
) -> torch.Tensor:
    """Candidate indices in ``[0, M)`` (LongTensor), SG (``antithetic=False``) or SAG: ``n`` of them
    with ``replacement`` (the reference), else ``min(n, M)`` distinct ones.

    ``extent`` = (height, width) of the image in spatial mode (cells are ``g × g`` of it); by
    default the bounding box of ``coords``.
    """
    draw = stratified_group_draw(M, n, g, antithetic, mode, coords, generator, extent, replacement)
    idx = draw.index[draw.index < M]
    idx = idx[torch.randperm(idx.numel(), generator=generator)]
    if replacement:
        pad = _randint(0, M, max(0, n - idx.numel()), generator)
        return torch.cat([idx, pad])[:n]
    unused = torch.ones(M, dtype=torch.bool)
    unused[idx] = False
    rest = unused.nonzero().flatten()
    pad = rest[torch.randperm(rest.numel(), generator=generator)[: max(0, min(n, M) - idx.numel())]]
    return torch.cat([idx, pad])[: min(n, M)]


def uniform_sample(M: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The baseline: ``n`` uniform draws with replacement from ``[0, M)``."""
    return _randint(0, M, n, generator)
