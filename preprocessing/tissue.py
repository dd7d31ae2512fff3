"""Tissue detection on a low-resolution image, and the per-patch background and flat-colour checks.

``detect_tissue``: HSV saturation → median blur → Otsu (never below the fixed threshold) or a fixed
threshold → morphological closing → fill holes smaller than ``min_hole_area_mm2`` → remove pen ink
(blue/green/black) → drop components smaller than ``min_area_mm2``. Physical sizes are converted
with the image's µm/px, so the same config works at any scan resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .config import TissueConfig


@dataclass
class TissueMask:
    mask: np.ndarray        # (h, w) bool
    mpp: float              # µm/px of the mask
    scale: tuple[float, float]  # mask px per level-0 px (x, y)
    threshold: int          # saturation threshold applied
    pen_pixels: int         # pixels removed as pen ink

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum()) * (self.mpp ** 2) / 1e6


def pen_ink_mask(rgb: np.ndarray) -> np.ndarray:
    """Blue, green or black marker ink (bool). H&E is pink/purple (hue ≥ 250° or ≤ 20°), never these."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]  # OpenCV hue is degrees / 2
    blue = (h >= 90) & (h <= 122) & (s >= 60) & (v >= 40)
    green = (h >= 35) & (h < 90) & (s >= 60) & (v >= 40)
    black = v < 45
    return blue | green | black


def _disk(radius_px: float) -> np.ndarray:
    r = max(1, int(round(radius_px)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected components of ``mask`` smaller than ``min_px`` pixels."""
    if min_px <= 1 or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill background components enclosed by tissue (not touching the border) smaller than ``max_px``."""
    if max_px <= 0:
        return mask
    bg = (~mask).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(bg, connectivity=4)
    h, w = mask.shape
    x, y, bw, bh = (stats[:, k] for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    inner = (x > 0) & (y > 0) & (x + bw < w) & (y + bh < h)
    fill = inner & (stats[:, cv2.CC_STAT_AREA] < max_px)
    fill[0] = False  # label 0 = tissue pixels
    return mask | fill[labels]


def detect_tissue(rgb: np.ndarray, mpp: float, cfg: TissueConfig,
                  level0_size: tuple[int, int] | None = None) -> TissueMask:
    """Tissue mask of ``rgb`` (an RGB uint8 image at ``mpp`` µm/px).

    ``level0_size`` = (width, height) of the slide, to record the mask-to-level-0 scale exactly.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    k = int(cfg.median_blur)
    if k >= 3:
        sat = cv2.medianBlur(sat, k | 1)
    if cfg.method == "otsu":
        otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = max(int(otsu), int(cfg.saturation_threshold))  # a blank slide must not become "tissue"
    else:
        threshold = int(cfg.saturation_threshold)
    mask = sat > threshold
    if cfg.close_um > 0:
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, _disk(cfg.close_um / mpp)).astype(bool)
    px_per_mm2 = 1e6 / (mpp * mpp)
    mask = _fill_small_holes(mask, cfg.min_hole_area_mm2 * px_per_mm2)
    pen_pixels = 0
    if cfg.pen_filter:
        pen = pen_ink_mask(rgb)
        if pen.any():
            pen = cv2.dilate(pen.astype(np.uint8), _disk(1)).astype(bool)
            pen_pixels = int((mask & pen).sum())
            mask &= ~pen
    mask = _remove_small(mask, cfg.min_area_mm2 * px_per_mm2)
    h, w = mask.shape
    if level0_size is None:
        scale = (1.0, 1.0)
    else:
        scale = (w / level0_size[0], h / level0_size[1])
    return TissueMask(mask=mask, mpp=float(mpp), scale=scale, threshold=threshold, pen_pixels=pen_pixels)


def background_fraction(patches: np.ndarray, white_threshold: int, black_threshold: int) -> np.ndarray:
    """(N,) fraction of near-white (min RGB > white) or near-black (max RGB < black) pixels per patch."""
    n = len(patches)
    if n == 0:
        return np.zeros(0, np.float32)
    patches = np.ascontiguousarray(patches)
    flat = patches.reshape(-1, patches.shape[2], 3)  # cv2.inRange: all three channels within bounds, SIMD
    bg = cv2.inRange(flat, (white_threshold + 1,) * 3, (255,) * 3)
    if black_threshold > 0:
        bg |= cv2.inRange(flat, (0, 0, 0), (black_threshold - 1,) * 3)
    per_patch = bg.reshape(n, patches.shape[1], patches.shape[2])
    counts = np.array([cv2.countNonZero(m) for m in per_patch], np.float64)
    return (counts / (patches.shape[1] * patches.shape[2])).astype(np.float32)


def dominant_colour_fraction(patches: np.ndarray, tolerance: int, samples: int = 32) -> np.ndarray:
    """(N,) fraction of each patch's pixels within ``tolerance`` levels, in every channel, of its
    dominant colour (the per-channel median), on a ``samples`` × ``samples`` grid of its pixels (cheap:
    about 1,000 pixels per patch). Near 1 for a flat patch (background, a blank or mis-decoded region)."""
    n = len(patches)
    if n == 0:
        return np.zeros(0, np.float32)
    step = max(1, patches.shape[1] // samples)
    grid = patches[:, ::step, ::step].reshape(n, -1, 3).astype(np.int16)
    dominant = np.rint(np.median(grid, axis=1)).astype(np.int16)
    near = (np.abs(grid - dominant[:, None, :]) <= tolerance).all(axis=-1)
    return near.mean(axis=1).astype(np.float32)
