"""Write pyramidal tiled TIFFs (generic-tiff that OpenSlide opens), with µm/px in the header.

Used to convert plain images into slides, by the tests (slides with known content) and by the
tiling benchmark (a large mosaic of the real shared slides built at benchmark time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Literal

import cv2
import numpy as np
import tifffile


def _downsample2(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return cv2.resize(img, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)


def write_pyramidal_tiff(
    path: str | Path,
    image: np.ndarray,
    mpp: float | None,
    tile: int = 256,
    min_level_size: int = 512,
    compression: Literal["jpeg", "none", "deflate"] = "jpeg",
    quality: int = 90,
) -> Path:
    """Write ``image`` (H, W, 3 uint8) as a tiled pyramid with 2× downsampled levels.

    ``mpp`` is stored as TIFF resolution in pixels per centimetre (OpenSlide reports it as
    ``openslide.mpp-x``); pass ``None`` for a slide without resolution.
    """
    path = Path(path)
    levels = [np.ascontiguousarray(image)]
    while min(levels[-1].shape[:2]) // 2 >= min_level_size:
        levels.append(_downsample2(levels[-1]))
    comp = None if compression == "none" else compression
    comp_args = {"compression": comp}
    if compression == "jpeg":
        comp_args["compressionargs"] = {"level": quality}
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tif:
        for i, level in enumerate(levels):
            kwargs = dict(tile=(tile, tile), photometric="rgb", **comp_args)
            if mpp:
                ppcm = 1e4 / (mpp * 2**i)
                kwargs.update(resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
            tif.write(level, subfiletype=0 if i == 0 else 1, **kwargs)
    return path


def write_pyramidal_tiff_tiled(
    path: str | Path,
    shape: tuple[int, int],
    tiles: "callable",
    mpp: float | None,
    tile: int = 256,
    n_levels: int = 4,
    quality: int = 90,
) -> Path:
    """Write a large pyramid without holding it in memory.

    ``tiles(level, y, x, tile)`` returns the ``(tile, tile, 3)`` uint8 content of the tile whose
    top-left is ``(x, y)`` at ``level`` (downsample ``2**level``). Peak memory is one tile.
    """
    path = Path(path)
    h0, w0 = shape
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(n_levels):
            h, w = max(1, h0 >> level), max(1, w0 >> level)

            def gen(level=level, h=h, w=w) -> Iterator[np.ndarray]:
                for y in range(0, h, tile):
                    for x in range(0, w, tile):
                        yield tiles(level, y, x, tile)

            kwargs = dict(
                shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                compression="jpeg", compressionargs={"level": quality}, subfiletype=0 if level == 0 else 1,
            )
            if mpp:
                ppcm = 1e4 / (mpp * 2**level)
                kwargs.update(resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
            tif.write(gen(), **kwargs)
    return path
