"""A thin adapter from a slide file to "read this level-0 box at this pyramid level as RGB uint8",
used by :func:`~evaluation.segmentation.sliding_window.predict_slide_region`.

It uses the tiling stage's readers (``preprocessing.readers.open_slide``) when available, else
OpenSlide directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class SlideSourceError(ValueError):
    """A slide that cannot be opened or has no usable µm/px."""


class RegionSource:
    """Level geometry + RGB reads of one slide; a context manager that closes the slide."""

    def __init__(self, path: str | Path, slide_mpp: float | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise SlideSourceError(f"slide {self.path} does not exist")
        self._reader, self.kind = self._open()
        self.mpp = float(slide_mpp) if slide_mpp else self._header_mpp()
        if not self.mpp or self.mpp <= 0:
            raise SlideSourceError(
                f"{self.path}: the slide header has no µm/px; pass the slide's resolution (slide_mpp=0.25 / --slide-mpp 0.25)")

    # -- backends ------------------------------------------------------------------------------
    def _open(self):
        try:
            from preprocessing.readers import open_slide  # the tiling stage's readers
        except ImportError:
            open_slide = None
        if open_slide is not None:
            try:
                return open_slide(self.path), "preprocessing.readers"
            except Exception as exc:  # noqa: BLE001 - re-raised with the file name
                raise SlideSourceError(f"{self.path}: cannot open slide: {exc}") from exc
        import openslide

        try:
            return openslide.OpenSlide(str(self.path)), "openslide"
        except Exception as exc:  # noqa: BLE001
            raise SlideSourceError(f"{self.path}: OpenSlide cannot open it ({exc}); convert it to a tiled TIFF") from exc

    def _header_mpp(self) -> float | None:
        value = getattr(self._reader, "mpp", None)
        if callable(value):
            value = value()
        if isinstance(value, (tuple, list)):
            value = value[0]
        if value:
            return float(value)
        props = getattr(self._reader, "properties", {}) or {}
        for key in ("openslide.mpp-x", "aperio.MPP"):
            if props.get(key):
                try:
                    return float(props[key])
                except ValueError:
                    pass
        return None

    @property
    def level_downsamples(self) -> list[float]:
        return [float(d) for d in getattr(self._reader, "level_downsamples", [1.0])]

    @property
    def level_dims0(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        dims = getattr(self._reader, "level_dimensions", None)
        if dims:
            return int(dims[0][0]), int(dims[0][1])
        w, h = self._reader.dimensions
        return int(w), int(h)

    def downsample(self, level: int) -> float:
        return self.level_downsamples[level]

    def best_level(self, scale: float) -> int:
        """The coarsest level whose downsample does not exceed ``scale`` (never upsample a coarser level)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= scale * (1 + 1e-3):
                best = i if ds >= self.level_downsamples[best] else best
        return best

    def read(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the box with level-0 origin (x0, y0) and size (w, h) at ``level``."""
        if self.kind == "openslide":
            region = np.asarray(self._reader.read_region((x0, y0), level, (w, h)))
            rgb = region[..., :3].astype(np.float32)
            alpha = region[..., 3:4].astype(np.float32) / 255.0  # outside the slide: white
            return (rgb * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
        arr = np.asarray(self._reader.read_region(x0, y0, level, w, h))
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[..., :3]
        return np.ascontiguousarray(arr, dtype=np.uint8)

    def close(self) -> None:
        close = getattr(self._reader, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "RegionSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_region_source(path: str | Path, slide_mpp: float | None = None) -> RegionSource:
    return RegionSource(path, slide_mpp)
