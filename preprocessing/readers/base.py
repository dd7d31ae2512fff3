"""The one reader interface every slide format goes through.

A reader exposes an OpenSlide-like pyramid: level-0 ``dimensions``, per-level dimensions and
downsamples, ``read_region(x0, y0, level, w, h, background)`` with a level-0 origin, returning an RGB
uint8 array, plus ``properties`` (header key/values, used by :mod:`preprocessing.mpp`) and ``vendor``.

Transparent pixels (outside the slide, gaps of sparse formats) become ``background``:
- ``"white"`` (default): composited onto white;
- ``"black"``: the alpha channel dropped the way OpenSlide-python + PIL ``.convert("RGB")`` do it
  (what CLAM and TRIDENT read): fully transparent pixels are black, partly transparent ones keep
  their un-premultiplied colour.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal, Mapping

import cv2
import numpy as np


Background = Literal["white", "black"]
BACKGROUNDS: tuple[str, ...] = ("white", "black")


class SlideOpenError(RuntimeError):
    """A file that no reader can open; the message names the file and what to do."""


class SlideReadError(RuntimeError):
    """A region that cannot be decoded (corrupt tile, truncated file)."""


def rgba_to_rgb(rgba: np.ndarray, background: Background = "white") -> np.ndarray:
    """A straight-alpha RGBA uint8 array as RGB: composited onto white, or for ``"black"`` with the
    alpha dropped and fully transparent pixels set to 0 (PIL's RGBA→RGB on OpenSlide's output)."""
    if rgba.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {rgba.shape}")
    if rgba.shape[2] == 3:
        return np.ascontiguousarray(rgba)
    if rgba.shape[2] == 1:
        return np.repeat(rgba, 3, axis=2)
    if rgba.shape[2] == 2:  # grey + alpha
        rgba = np.concatenate([np.repeat(rgba[..., :1], 3, axis=2), rgba[..., 1:]], axis=2)
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    if cv2.minMaxLoc(alpha)[0] == 255:
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    if background == "black":
        return np.where(alpha[..., None] == 0, np.uint8(0), rgb).astype(np.uint8)
    a = alpha.astype(np.uint16)[..., None]
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class SlideReader(ABC):
    """A whole-slide image opened for reading (one handle per process)."""

    name: str = "base"
    # geometry and header, filled by each reader when it opens the slide
    _dims: tuple[tuple[int, int], ...] = ()
    _ds: tuple[float, ...] = ()
    _props: Mapping[str, str] = {}

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- pyramid geometry -----------------------------------------------------------------
    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every level, level 0 first."""
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample of every level relative to level 0 (level 0 = 1.0)."""
        return self._ds

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def properties(self) -> Mapping[str, str]:
        """Header key/values, OpenSlide-style (``openslide.mpp-x``, ``openslide.vendor``, ...)."""
        return self._props

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
    def read_region(self, x0: int, y0: int, level: int, w: int, h: int, background: Background = "white") -> np.ndarray:
        """(h, w, 3) uint8 RGB of the region at ``level`` whose top-left is level-0 (x0, y0); pixels
        outside the slide are ``background`` (module docstring)."""

    def read_level(self, level: int) -> np.ndarray:
        """A whole level as RGB (use only on low-resolution levels)."""
        w, h = self.level_dimensions[level]
        return self.read_region(0, 0, level, w, h)

    def read_scaled(self, downsample: float, max_block_pixels: int = 1 << 24) -> np.ndarray:
        """The whole slide at ``downsample`` × level 0, resampled with INTER_AREA.

        Reads the best pyramid level in blocks of at most ``max_block_pixels`` level pixels
        (64 MB RGBA), so memory stays ~ one block + the output even for a single-level gigapixel TIFF.
        """
        w0, h0 = self.dimensions
        out_w, out_h = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
        level = self.best_level_for_downsample(downsample)
        lw, lh = self.level_dimensions[level]
        if lw == out_w and lh == out_h:
            return self.read_level(level)
        ds = self.level_downsamples[level]
        sx, sy = out_w / lw, out_h / lh  # output px per level px
        side = max(1, int(math.sqrt(max_block_pixels)))
        bw, bh = max(1, int(side * sx)), max(1, int(side * sy))  # output block size
        out = np.empty((out_h, out_w, 3), np.uint8)
        for oy in range(0, out_h, bh):
            oy2 = min(out_h, oy + bh)
            ly, ly2 = int(math.floor(oy / sy)), min(lh, int(math.ceil(oy2 / sy)))
            for ox in range(0, out_w, bw):
                ox2 = min(out_w, ox + bw)
                lx, lx2 = int(math.floor(ox / sx)), min(lw, int(math.ceil(ox2 / sx)))
                block = self.read_region(int(round(lx * ds)), int(round(ly * ds)), level, max(1, lx2 - lx), max(1, ly2 - ly))
                out[oy:oy2, ox:ox2] = cv2.resize(block, (ox2 - ox, oy2 - oy), interpolation=cv2.INTER_AREA)
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
