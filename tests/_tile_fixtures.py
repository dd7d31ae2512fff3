"""Synthetic slides with known content for the tiling tests (written with the project's TIFF writer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocessing.pyramid_writer import write_pyramidal_tiff

# (cx, cy, rx, ry) of tissue-like ellipses, as fractions of the image size
BLOBS = ((0.30, 0.35, 0.22, 0.18), (0.70, 0.65, 0.20, 0.25))


def synthetic_he(height: int, width: int, seed: int = 0) -> np.ndarray:
    """White-ish background + two pink/purple ellipses whose colour is a smooth function of (x, y),
    so every patch position has distinct content."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    img[...] = (243, 241, 246)
    img += rng.normal(0, 1.5, img.shape)
    inside = np.zeros((height, width), bool)
    for cx, cy, rx, ry in BLOBS:
        inside |= ((xx - cx * width) / (rx * width)) ** 2 + ((yy - cy * height) / (ry * height)) ** 2 <= 1
    tissue = np.stack([
        185 + 40 * np.sin(xx / 37.0),
        90 + 45 * np.sin(yy / 23.0),
        165 + 30 * np.sin((xx + yy) / 51.0),
    ], axis=-1)
    img[inside] = tissue[inside]
    return np.clip(img, 0, 255).astype(np.uint8)


def tissue_truth(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    inside = np.zeros((height, width), bool)
    for cx, cy, rx, ry in BLOBS:
        inside |= ((xx - cx * width) / (rx * width)) ** 2 + ((yy - cy * height) / (ry * height)) ** 2 <= 1
    return inside


def write_synthetic_slide(path: Path, height: int, width: int, mpp: float | None, pyramid: bool = True,
                          compression: str = "jpeg", seed: int = 0) -> Path:
    """A pyramidal (2× levels) or single-level tiled TIFF of :func:`synthetic_he` content."""
    image = synthetic_he(height, width, seed)
    min_level = 256 if pyramid else max(height, width) + 1
    return write_pyramidal_tiff(path, image, mpp, min_level_size=min_level, compression=compression, quality=95)


def write_synthetic_slides(folder: Path, n: int, height: int, width: int, mpp: float = 0.5) -> Path:
    """``folder/s0.tiff`` … ``s{n-1}.tiff``: ``n`` distinct synthetic slides (seeds 0…n-1); returns ``folder``."""
    for i in range(n):
        write_synthetic_slide(folder / f"s{i}.tiff", height, width, mpp=mpp, seed=i)
    return folder
