"""Spatial neighbours on the patch grid of each slide, from a sorted key index (no B×N masks).

``P^sp_i = { j : slide(j) = slide(i) and 0 < ‖grid_j − grid_i‖₂ < radius }`` (methods.md §1.5).
Each patch gets a 64-bit key ``(slide, column, row)``; the keys are sorted once (O(N) memory:
one int64 key and one int64 position per patch), and the neighbours of a batch are found by
``searchsorted`` of the anchor's key shifted by every grid offset inside the radius. Radius 3
(the default) is the 5×5 window minus the centre: at most 24 neighbours; fewer at tissue borders
and slide edges, where the missing cells simply have no patch.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch


class Neighbors(NamedTuple):
    """Padded neighbour sets of a batch.

    ``index`` (B, K) int64 global patch indices (padding repeats the anchor, masked out);
    ``mask`` (B, K) bool; ``fallback`` (B,) bool: rows whose neighbourhood was empty and that
    hold the anchor itself instead (column 0, mask True).
    """

    index: torch.Tensor
    mask: torch.Tensor
    fallback: torch.Tensor

    def count(self) -> torch.Tensor:
        """Number of true neighbours per anchor (0 for fallback rows)."""
        return self.mask.sum(1) * (~self.fallback)


def grid_offsets(radius: float) -> torch.Tensor:
    """(K, 2) int64 offsets (dcol, drow) with ``0 < ‖·‖₂ < radius``, nearest first."""
    if radius <= 0:
        return torch.zeros(0, 2, dtype=torch.long)
    r = int(math.ceil(radius))
    rng = torch.arange(-r, r + 1)
    dc, dr = torch.meshgrid(rng, rng, indexing="xy")
    off = torch.stack([dc.reshape(-1), dr.reshape(-1)], 1)
    d2 = (off * off).sum(1)
    keep = (d2 > 0) & (d2.double() < float(radius) ** 2)
    off, d2 = off[keep], d2[keep]
    order = torch.argsort(d2 * (4 * r + 4) ** 2 + (off[:, 1] + 2 * r + 2) * (4 * r + 4) + off[:, 0] + 2 * r + 2)
    return off[order]


class SpatialIndex:
    """Per-slide grid index over ``slide_of`` (N,) and ``grid_of`` (N, 2) = (column, row)."""

    def __init__(self, slide_of: torch.Tensor, grid_of: torch.Tensor, radius: float = 3.0):
        slide_of = torch.as_tensor(slide_of).long().reshape(-1)
        grid_of = torch.as_tensor(grid_of).long()
        if grid_of.dim() != 2 or grid_of.shape[1] != 2 or grid_of.shape[0] != slide_of.shape[0]:
            raise ValueError(f"grid_of must be (N, 2) matching slide_of (N,), got {tuple(grid_of.shape)} and {tuple(slide_of.shape)}")
        if slide_of.numel() == 0:
            raise ValueError("SpatialIndex needs at least one patch")
        if int(slide_of.min()) < 0:
            raise ValueError("slide indices must be >= 0")
        self.radius = float(radius)
        self.slide_of = slide_of
        self.grid_of = grid_of
        self._origin = grid_of.min(0).values  # grids may hold negative cells; shift to >= 0
        g = grid_of - self._origin
        self._pad = int(math.ceil(max(self.radius, 1.0))) + 1  # room for offsets beyond the edges
        span = g.max(0).values + 1 + 2 * self._pad
        self._ncol, self._nrow = int(span[0]), int(span[1])
        if (int(slide_of.max()) + 1) * self._ncol * self._nrow >= 2**62:
            raise ValueError("grid too large for 64-bit keys; check grid coordinates are tile indices, not pixels")
        keys = self._key(slide_of, g[:, 0], g[:, 1])
        self.sorted_keys, self.order = torch.sort(keys)
        dup = self.sorted_keys[1:] == self.sorted_keys[:-1]
        if bool(dup.any()):
            j = int(self.order[1:][dup][0])
            raise ValueError(
                f"two patches share slide {int(slide_of[j])} grid cell {tuple(grid_of[j].tolist())}: "
                "grid coordinates must be unique per slide (re-tile, or deduplicate the HDF5 files)"
            )
        self._offsets: dict[float, torch.Tensor] = {}

    def _key(self, slide: torch.Tensor, col: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        return (slide * self._ncol + (col + self._pad)) * self._nrow + (row + self._pad)

    @property
    def num_patches(self) -> int:
        return int(self.slide_of.shape[0])

    def to(self, device: torch.device | str) -> "SpatialIndex":
        """A copy on ``device`` (the original, e.g. the dataset's, stays where it is)."""
        other = copy.copy(self)
        for name in ("slide_of", "grid_of", "_origin", "sorted_keys", "order"):
            setattr(other, name, getattr(self, name).to(device))
        other._offsets = {}
        return other

    def offsets(self, radius: float | None = None) -> torch.Tensor:
        r = self.radius if radius is None else float(radius)
        if r not in self._offsets:
            self._offsets[r] = grid_offsets(r).to(self.sorted_keys.device)
        return self._offsets[r]

    def max_neighbors(self, radius: float | None = None) -> int:
        return int(self.offsets(radius).shape[0])

    def lookup(self, slide: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Global index of the patch at ``slide``/``grid`` (any batch shape), −1 where none."""
        g = grid.long().to(self.sorted_keys.device) - self._origin
        col, row = g[..., 0], g[..., 1]
        inside = (col >= 0) & (row >= 0) & (col < self._ncol - 2 * self._pad) & (row < self._nrow - 2 * self._pad)
        key = self._key(slide.long().to(col.device), col, row)
        pos = torch.searchsorted(self.sorted_keys, key.reshape(-1)).reshape(key.shape).clamp_max(self.sorted_keys.numel() - 1)
        found = inside & (self.sorted_keys[pos] == key)
        return torch.where(found, self.order[pos], torch.full_like(pos, -1))

    def neighbors(self, index: torch.Tensor, radius: float | None = None, fallback_to_self: bool = True) -> Neighbors:
        """Neighbours of the patches ``index`` (B,) inside ``radius`` grid cells of the same slide.

        Returns padded (B, K) indices and mask, K = the largest count in this batch (≥ 1).
        An empty neighbourhood gives the anchor itself (``fallback``) unless ``fallback_to_self``
        is False, in which case the row is all masked.
        """
        device = self.sorted_keys.device
        index = index.long().to(device)
        off = self.offsets(radius)
        b = index.shape[0]
        if off.numel() == 0 or b == 0:
            nb = torch.full((b, 0), -1, dtype=torch.long, device=device)
        else:
            grid = self.grid_of[index].unsqueeze(1) + off.unsqueeze(0)  # (B, K, 2)
            slide = self.slide_of[index].unsqueeze(1).expand(-1, off.shape[0])
            nb = self.lookup(slide, grid)
        found = nb >= 0
        counts = found.sum(1)
        k = max(int(counts.max()) if b and nb.shape[1] else 0, 1)
        # stable compaction: found entries first, in offset order (nearest first)
        order = torch.argsort((~found).to(torch.int8), dim=1, stable=True)[:, :k] if nb.shape[1] else torch.zeros(b, 0, dtype=torch.long, device=device)
        out = torch.gather(nb, 1, order) if nb.shape[1] else torch.full((b, 1), -1, dtype=torch.long, device=device)
        if out.shape[1] < k:
            out = torch.cat([out, out.new_full((b, k - out.shape[1]), -1)], 1)
        mask = out >= 0
        empty = counts == 0
        if fallback_to_self:
            out[empty, 0] = index[empty]
            mask[empty, 0] = True
        else:
            empty = torch.zeros_like(empty)
        out = torch.where(mask, out, index.unsqueeze(1).expand_as(out))
        return Neighbors(out, mask, empty)
