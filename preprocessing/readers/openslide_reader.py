"""OpenSlide reader: svs, tif/tiff, ndpi, mrxs, scn, bif, vms/vmu, svslide, DICOM-WSI (dcm)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from .base import SlideOpenError, SlideReader, SlideReadError, rgba_to_rgb


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
        self._dims = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
        self._ds = tuple(float(d) for d in self._slide.level_downsamples)
        self._props = dict(self._slide.properties)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._ds

    @property
    def properties(self) -> Mapping[str, str]:
        return self._props

    def read_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        try:
            img = self._slide.read_region((int(x0), int(y0)), int(level), (int(w), int(h)))
        except self._openslide.OpenSlideError as exc:
            raise SlideReadError(
                f"{self.path}: cannot decode region x={x0} y={y0} level={level} size={w}x{h} ({exc})"
            ) from exc
        return rgba_to_rgb(np.asarray(img))

    def close(self) -> None:
        if getattr(self, "_slide", None) is not None:
            self._slide.close()
            self._slide = None
