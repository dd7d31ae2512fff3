"""The one reader interface every slide format goes through.

A reader exposes an OpenSlide-like pyramid: level-0 ``dimensions``, per-level dimensions and
downsamples, ``read_region(x0, y0, level, w, h)`` with a level-0 origin, returning an RGB uint8
array (transparent pixels composited onto white), plus ``properties`` (header key/values, used by
:mod:`preprocessing.mpp`) and ``vendor``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Mapping

import cv2
import numpy as np


class SlideOpenError(RuntimeError):
    """A file that no reader can open; the message names the file and what to do."""


class SlideReadError(RuntimeError):
    """A region that cannot be decoded (corrupt tile, truncated file)."""


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite a straight-alpha RGBA uint8 array onto white; returns a new RGB array."""
    if rgba.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {rgba.shape}")
    if rgba.shape[2] == 3:
        return np.ascontiguousarray(rgba)
    if rgba.shape[2] == 1:
        return np.repeat(rgba, 3, axis=2)
    if rgba.shape[2] == 2:  # grey + alpha
        rgba = np.concatenate([np.repeat(rgba[..., :1], 3, axis=2), rgba[..., 1:]], axis=2)
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)[..., None]
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class SlideReader(ABC):
    """A whole-slide image opened for reading (one handle per process)."""

    name: str = "base"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- pyramid geometry -----------------------------------------------------------------
    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every level, level 0 first."""

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample of every level relative to level 0 (level 0 = 1.0)."""

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def properties(self) -> Mapping[str, str]:
        return {}

    @property
    def vendor(self) -> str:
        return str(self.properties.get("openslide.vendor", "unknown"))

    def best_level_for_downsample(self, downsample: float, tolerance: float = 0.01) -> int:
        """The lowest-resolution level whose downsample is ≤ ``downsample`` (× 1 + tolerance)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + tolerance) and ds >= self.level_downsamples[best]:
                best = i
        return best

    # -- pixels ---------------------------------------------------------------------------
    @abstractmethod
    def read_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the region at ``level`` whose top-left is level-0 (x0, y0)."""

    def read_level(self, level: int) -> np.ndarray:
        """A whole level as RGB (use only on low-resolution levels)."""
        w, h = self.level_dimensions[level]
        return self.read_region(0, 0, level, w, h)

    def read_scaled(self, downsample: float, strip_rows: int = 2048) -> np.ndarray:
        """The whole slide at ``downsample`` × level 0, resampled exactly (INTER_AREA).

        Reads the best level in horizontal strips, so memory stays ~ one strip + the output even
        for a single-level gigapixel TIFF.
        """
        w0, h0 = self.dimensions
        out_w, out_h = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
        level = self.best_level_for_downsample(downsample)
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        scale_y = out_h / lh
        if lw == out_w and lh == out_h:
            return self.read_level(level)
        out = np.empty((out_h, out_w, 3), np.uint8)
        # each strip covers whole output rows: output rows [oy, oy2) <- level rows [ly, ly2)
        rows_per_strip = max(1, int(strip_rows * scale_y))
        for oy in range(0, out_h, rows_per_strip):
            oy2 = min(out_h, oy + rows_per_strip)
            ly, ly2 = int(math.floor(oy / scale_y)), min(lh, int(math.ceil(oy2 / scale_y)))
            strip = self.read_region(0, int(round(ly * ds)), level, lw, max(1, ly2 - ly))
            out[oy:oy2] = cv2.resize(strip, (out_w, oy2 - oy), interpolation=cv2.INTER_AREA)
        return out

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """RGB thumbnail whose longer side is at most ``max_size`` pixels."""
        w0, h0 = self.dimensions
        return self.read_scaled(max(1.0, max(w0, h0) / max_size))

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:  # noqa: B027 - optional for readers without handles
        pass

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, levels={self.level_count}, dims={self.dimensions})"
