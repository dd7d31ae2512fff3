"""A thin adapter from a slide file to "read this level-0 box at this pyramid level as RGB uint8",
used by :func:`~evaluation.segmentation.sliding_window.predict_slide_region`.

Slides are opened through the tiling stage's readers (``preprocessing.readers.open_slide``:
OpenSlide formats, plain images, TIAToolbox) and their µm/px resolved by ``preprocessing.mpp``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocessing.mpp import MppError, resolve_mpp
from preprocessing.readers import SlideOpenError, open_slide


class SlideSourceError(ValueError):
    """A slide that cannot be opened or has no usable µm/px."""


class RegionSource:
    """Level geometry + RGB reads of one slide; a context manager that closes the slide."""

    kind = "preprocessing.readers"

    def __init__(self, path: str | Path, slide_mpp: float | None = None):
        self.path = Path(path)
        try:
            self._reader = open_slide(self.path)
        except SlideOpenError as exc:
            raise SlideSourceError(str(exc)) from None
        try:
            mpp = resolve_mpp(self.path, self._reader.properties, override=slide_mpp)
        except MppError as exc:
            self._reader.close()
            raise SlideSourceError(f"{self.path}: no usable µm/px in the slide header ({exc}); pass the slide's "
                                   "resolution with --slide-mpp VALUE (slide_mpp=VALUE), e.g. 0.25 for 40x, 0.5 for 20x") from None
        self.mpp, self.mpp_source = float(mpp.value), mpp.source
        self.reader_name = getattr(self._reader, "name", type(self._reader).__name__)

    @property
    def level_downsamples(self) -> list[float]:
        return [float(d) for d in self._reader.level_downsamples]

    @property
    def level_dims0(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        w, h = self._reader.dimensions
        return int(w), int(h)

    def downsample(self, level: int) -> float:
        return self.level_downsamples[level]

    def best_level(self, scale: float) -> int:
        """The coarsest level whose downsample does not exceed ``scale`` (never upsample a coarser level)."""
        return int(self._reader.best_level_for_downsample(scale, tolerance=1e-3))

    def read(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the box with level-0 origin (x0, y0) and size (w, h) at ``level``."""
        return np.ascontiguousarray(self._reader.read_region(x0, y0, level, w, h), dtype=np.uint8)

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """RGB overview whose longer side is at most ``max_size`` px (read in strips: bounded memory)."""
        return self._reader.thumbnail(max_size)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "RegionSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_region_source(path: str | Path, slide_mpp: float | None = None) -> RegionSource:
    return RegionSource(path, slide_mpp)
