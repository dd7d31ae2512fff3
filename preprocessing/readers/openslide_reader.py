"""OpenSlide reader: svs, tif/tiff, ndpi, mrxs, scn, bif, vms/vmu, svslide, DICOM-WSI (dcm)."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import cv2
import numpy as np

from .base import Background, SlideOpenError, SlideReader, SlideReadError, rgba_to_rgb


def _fast_read_function():
    """openslide-python's ctypes binding of ``openslide_read_region`` (with its error check), or None."""
    if sys.byteorder != "little":
        return None
    try:
        from openslide import lowlevel

        return getattr(lowlevel, "_read_region", None)
    except Exception:  # noqa: BLE001 - fall back to the public API
        return None


_FAST_READ = _fast_read_function()
CACHE_MB = 128  # decoded-tile cache of a process, shared by the slides it opens
_PROCESS_CACHE: tuple[int, object] | None = None  # (pid, OpenSlideCache)


def _process_cache(openslide, capacity: int):
    """One OpenSlide tile cache per process, shared by every slide it opens (OpenSlide ≥ 4.0 allows
    that), so a loader holding many slides open for random reads stays within one cache's memory.
    A forked child makes its own."""
    global _PROCESS_CACHE
    if _PROCESS_CACHE is None or _PROCESS_CACHE[0] != os.getpid():
        _PROCESS_CACHE = (os.getpid(), openslide.OpenSlideCache(capacity))
    return _PROCESS_CACHE[1]


class OpenSlideReader(SlideReader):
    name = "openslide"

    def __init__(self, path: str | Path):
        super().__init__(path)
        import openslide

        self._openslide = openslide
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError, OSError) as exc:
            raise SlideOpenError(f"{self.path}: OpenSlide cannot open it ({type(exc).__name__}: {exc})") from exc
        self._set_cache()
        self._dims = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
        self._ds = tuple(float(d) for d in self._slide.level_downsamples)
        self._props = dict(self._slide.properties)

    def _set_cache(self) -> None:
        """A tile cache that holds a whole tile row of a wide slide (OpenSlide's default, 32 MiB, does not
        for slides wider than ~32k px, so every tile straddling two patch rows is decoded twice).
        Bounded and shared by the slides of a process, so memory grows neither with slide size nor with
        the number of open slides; ``SGCL_OPENSLIDE_CACHE_MB`` overrides its size."""
        if not hasattr(self._openslide, "OpenSlideCache"):
            return
        try:
            mb = int(os.environ.get("SGCL_OPENSLIDE_CACHE_MB", CACHE_MB))
            self._slide.set_cache(_process_cache(self._openslide, mb << 20))
        except (ValueError, self._openslide.OpenSlideError, AttributeError):
            pass  # OpenSlide < 4.0: keep its default cache

    def read_region(self, x0: int, y0: int, level: int, w: int, h: int, background: Background = "white") -> np.ndarray:
        try:
            if _FAST_READ is not None and w > 0 and h > 0:
                return self._read_fast(int(x0), int(y0), int(level), int(w), int(h), background)
            img = self._slide.read_region((int(x0), int(y0)), int(level), (int(w), int(h)))
        except self._openslide.OpenSlideError as exc:
            raise SlideReadError(
                f"{self.path}: cannot decode region x={x0} y={y0} level={level} size={w}x{h} ({exc})"
            ) from exc
        return rgba_to_rgb(np.asarray(img), background)

    def _read_fast(self, x0: int, y0: int, level: int, w: int, h: int, background: Background) -> np.ndarray:
        """OpenSlide's C call into a numpy buffer, converted in one cv2 pass (≈12 % less CPU than
        the PIL route: no un-premultiply, no PIL image, one copy fewer). Same pixels."""
        buf = np.empty((h, w), np.uint32)
        _FAST_READ(self._slide._osr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), x0, y0, level, w, h)
        bgra = buf.view(np.uint8).reshape(h, w, 4)  # premultiplied ARGB in native (little-endian) order
        rgb = cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGB)
        alpha = bgra[..., 3]
        if cv2.minMaxLoc(alpha)[0] == 255:
            return rgb
        if background == "black":  # openslide-python's un-premultiply (c·255 // a), then PIL drops alpha
            a = alpha.astype(np.uint16)[..., None]
            return np.where(a > 0, rgb.astype(np.uint16) * 255 // np.maximum(a, 1), 0).astype(np.uint8)
        return cv2.add(rgb, cv2.cvtColor(255 - alpha, cv2.COLOR_GRAY2RGB))  # on white: colour + (255 - alpha)

    def close(self) -> None:
        if getattr(self, "_slide", None) is not None:
            self._slide.close()
            self._slide = None
