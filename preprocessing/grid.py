"""Patch geometry at a target µm/px, the patch grid, and per-cell tissue fractions.

All sizes are exact floats until the last step: the patch covers
``patch_size_level0 = patch_size · target_mpp / mpp`` level-0 pixels. It is read at the
lowest-resolution pyramid level whose µm/px is ≤ the target, as ``read_size`` pixels of that level
(the nearest integer), and resized exactly to ``patch_size`` (INTER_AREA down, INTER_CUBIC up).
The achieved µm/px (``read_size · level_mpp / patch_size``) is recorded, never a nominal
magnification. Grid origins are placed on the read level's pixel grid so that every stored
level-0 coordinate maps to a whole read-level pixel.

Edge cells (``patch.edge``): with ``skip`` only cells whose read window lies wholly inside the read
level are candidates; with ``pad_white``/``pad_black`` every cell whose origin lies inside the slide
is, and the reader fills its outside part; their tissue fraction is over the whole footprint, so the
outside part counts as background.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import cv2
import numpy as np

LEVEL_TOLERANCE = 0.01  # a level up to 1 % coarser than the target still counts as "at the target"


@dataclass(frozen=True)
class PatchGeometry:
    mpp: float                # level-0 µm/px
    target_mpp: float         # requested output µm/px
    patch_size: int           # output patch side, px
    stride: int               # output px between patch origins
    read_level: int
    read_downsample: float    # downsample of read_level
    read_size: int            # patch side read at read_level, px
    read_stride: float        # stride at read_level, px (float, exact)
    patch_size_level0: float  # exact physical patch side in level-0 px
    stride_level0: float
    achieved_mpp: float       # µm/px of the stored patches

    @property
    def resize(self) -> bool:
        return self.read_size != self.patch_size

    @property
    def upsampled(self) -> bool:
        return self.read_size < self.patch_size

    def as_dict(self) -> dict:
        return asdict(self)


def choose_level(level_downsamples: Sequence[float], mpp: float, target_mpp: float,
                 tolerance: float = LEVEL_TOLERANCE) -> int:
    """Lowest-resolution level whose µm/px is ≤ ``target_mpp`` (× 1 + tolerance); level 0 if none."""
    best = 0
    for i, ds in enumerate(level_downsamples):
        if mpp * ds <= target_mpp * (1 + tolerance) and ds >= level_downsamples[best]:
            best = i
    return best


def plan_geometry(level_downsamples: Sequence[float], mpp: float, target_mpp: float, patch_size: int,
                  stride: int | None = None) -> PatchGeometry:
    if not (mpp > 0 and target_mpp > 0):
        raise ValueError(f"mpp and target_mpp must be > 0 (got {mpp}, {target_mpp})")
    if patch_size < 1:
        raise ValueError(f"patch_size must be ≥ 1, got {patch_size}")
    stride = int(stride or patch_size)
    if stride < 1:
        raise ValueError(f"stride must be ≥ 1, got {stride}")
    level = choose_level(level_downsamples, mpp, target_mpp)
    ds = float(level_downsamples[level])
    ps0 = patch_size * target_mpp / mpp
    read_size = max(1, int(round(ps0 / ds)))
    stride0 = stride * target_mpp / mpp
    return PatchGeometry(
        mpp=float(mpp), target_mpp=float(target_mpp), patch_size=int(patch_size), stride=stride,
        read_level=level, read_downsample=ds, read_size=read_size, read_stride=stride0 / ds,
        patch_size_level0=ps0, stride_level0=stride0, achieved_mpp=read_size * ds * mpp / patch_size,
    )


@dataclass(frozen=True)
class Grid:
    """All candidate cells of a slide, row-major: ``cols[i], rows[i]`` and their read-level and level-0 origins."""
    n_cols: int
    n_rows: int
    x_level: np.ndarray  # (n_cols,) int64 origins at the read level
    y_level: np.ndarray  # (n_rows,)
    x0: np.ndarray       # (n_cols,) int64 level-0 origins
    y0: np.ndarray       # (n_rows,)


EDGE_MODES: tuple[str, ...] = ("skip", "pad_white", "pad_black")


def edge_background(edge: str) -> Literal["white", "black"]:
    """The reader background (``preprocessing.readers.base``) that pads edge cells in ``patch.edge`` mode
    ``edge``: black for ``pad_black``, else white (``skip`` reads nothing outside the slide)."""
    return "black" if edge == "pad_black" else "white"


def make_grid(geom: PatchGeometry, level_dimensions: Sequence[tuple[int, int]], edge: str = "skip") -> Grid:
    """Candidate cells: for ``edge="skip"`` those whose whole read window lies inside the read level
    (cells crossing the right/bottom edge are dropped), else every cell whose origin is inside it."""
    if edge not in EDGE_MODES:
        raise ValueError(f"patch.edge must be one of {EDGE_MODES}, got {edge!r}")
    lw, lh = level_dimensions[geom.read_level]

    def axis(extent: int) -> np.ndarray:
        if edge == "skip":
            if extent < geom.read_size:
                return np.zeros(0, np.int64)
            n = int(math.floor((extent - geom.read_size) / geom.read_stride + 1e-9)) + 1
            pos = np.round(np.arange(n) * geom.read_stride).astype(np.int64)
            return pos[pos + geom.read_size <= extent]
        pos = np.round(np.arange(int(math.ceil(extent / geom.read_stride)) + 1) * geom.read_stride).astype(np.int64)
        return pos[pos < extent]

    xl, yl = axis(lw), axis(lh)
    ds = geom.read_downsample
    return Grid(len(xl), len(yl), xl, yl, np.round(xl * ds).astype(np.int64), np.round(yl * ds).astype(np.int64))


def integral_image(mask: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row/column: ``S[y, x] = mask[:y, :x].sum()``."""
    dtype = np.int32 if mask.size < 2**31 else np.int64
    s = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype)
    np.cumsum(mask, axis=0, dtype=dtype, out=s[1:, 1:])
    np.cumsum(s[1:, 1:], axis=1, out=s[1:, 1:])
    return s


def cell_bounds(origins0: np.ndarray, size0: float, scale: float, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Mask-pixel [start, stop) of cells with level-0 ``origins0`` and side ``size0`` (mask px = level-0 px · scale),
    clipped to ``[0, limit]`` (``None``: not clipped)."""
    a = np.clip(np.round(origins0 * scale).astype(np.int64), 0, limit)
    b = np.clip(np.round((origins0 + size0) * scale).astype(np.int64), 0, limit)
    b = np.maximum(b, a + 1 if limit is None else np.minimum(a + 1, limit))
    return a, b


def tissue_fractions(mask: np.ndarray, mask_scale: tuple[float, float], grid: Grid, size0: float,
                     whole_footprint: bool = False) -> np.ndarray:
    """(n_rows, n_cols) float32 tissue fraction of every grid cell, in one vectorised pass.

    ``mask_scale`` = (sx, sy): mask pixels per level-0 pixel along x and y. The fraction is over the
    cell's footprint clipped to the mask, or with ``whole_footprint`` (padded edge cells) over all of
    it, so that the part outside the slide counts as background.
    """
    if grid.n_cols == 0 or grid.n_rows == 0:
        return np.zeros((grid.n_rows, grid.n_cols), np.float32)
    s = integral_image(mask)
    h, w = mask.shape
    xa, xb = cell_bounds(grid.x0, size0, mask_scale[0], w)
    ya, yb = cell_bounds(grid.y0, size0, mask_scale[1], h)
    total = (s[np.ix_(yb, xb)].astype(np.int64) - s[np.ix_(ya, xb)] - s[np.ix_(yb, xa)] + s[np.ix_(ya, xa)])
    if whole_footprint:
        xa, xb = cell_bounds(grid.x0, size0, mask_scale[0], None)
        ya, yb = cell_bounds(grid.y0, size0, mask_scale[1], None)
    area = (yb - ya)[:, None] * (xb - xa)[None, :]
    return (total / np.maximum(area, 1)).astype(np.float32)


def resize_patch(patch: np.ndarray, size: int) -> np.ndarray:
    """Exact resize to ``size``×``size``: INTER_AREA when shrinking, INTER_CUBIC when enlarging."""
    if patch.shape[0] == size and patch.shape[1] == size:
        return patch
    interp = cv2.INTER_AREA if patch.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(patch, (size, size), interpolation=interp)
