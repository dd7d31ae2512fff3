"""Crop policies (``sgcl.transforms.base.CropPolicy``): where in a source patch a view is cut.

``RandomResizedCropPolicy`` is torchvision's RandomResizedCrop as a policy that only *chooses* the
box (integer pixel box, so a native-size view is an exact slice); ``views.py`` cuts and resizes.
"""

from __future__ import annotations

import math

import numpy as np

from sgcl.transforms.base import CropBox


class RandomResizedCropPolicy:
    """A box of ``scale`` × area and aspect ratio in ``ratio`` (log-uniform), resized to ``out_size``.

    Falls back to the largest centred box of admissible aspect after 10 failed draws, like
    torchvision. ``out_size=None`` keeps the crop at its native size.
    """

    def __init__(self, out_size: int | None = 224, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {ratio}")
        self.out_size = out_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def sample(self, height: int, width: int, rng: np.random.Generator, image: np.ndarray | None = None) -> CropBox:
        area = height * width
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_r))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                x0 = int(rng.integers(0, width - w + 1))
                y0 = int(rng.integers(0, height - h + 1))
                return CropBox(x0, y0, w, h)
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return CropBox((width - w) // 2, (height - h) // 2, w, h)

    def sample_pair(self, height: int, width: int, rng: np.random.Generator, image: np.ndarray | None = None) -> tuple[CropBox, CropBox]:
        """Two independent boxes (the views of a two-view method)."""
        return self.sample(height, width, rng, image), self.sample(height, width, rng, image)

    def __repr__(self) -> str:
        return f"RandomResizedCropPolicy(out_size={self.out_size}, scale={self.scale}, ratio={self.ratio})"


class FullCropPolicy:
    """The whole patch (no crop), resized to ``out_size`` or kept native: evaluation-style views."""

    def __init__(self, out_size: int | None = None):
        self.out_size = out_size

    def sample(self, height: int, width: int, rng: np.random.Generator, image: np.ndarray | None = None) -> CropBox:
        return CropBox(0, 0, width, height)

    def sample_pair(self, height: int, width: int, rng: np.random.Generator, image: np.ndarray | None = None) -> tuple[CropBox, CropBox]:
        box = self.sample(height, width, rng, image)
        return box, box


def _small_window(out_size: int | None, scale=None, **options):  # noqa: ANN001 - lazy import keeps this module light
    from sgcl.transforms.scale_aware import small_window_policy

    return small_window_policy(out_size, scale, **options)


CROP_POLICIES = {"rrc": RandomResizedCropPolicy, "full": FullCropPolicy, "small_window": _small_window}


def register_crop_policy(name: str, factory) -> None:
    """Make a policy selectable by ``aug.crop=<name>`` (e.g. the scale-aware small-window crops)."""
    CROP_POLICIES[name] = factory


def build_crop_policy(name: str, out_size: int | None, scale: tuple[float, float] = (0.2, 1.0), **kwargs):
    """A crop policy by config name (``rrc`` | ``full`` | any registered name)."""
    if name not in CROP_POLICIES:
        raise ValueError(f"unknown crop policy {name!r}; choose one of {sorted(CROP_POLICIES)}")
    if name == "rrc":
        return RandomResizedCropPolicy(out_size, scale=tuple(scale), **kwargs)
    if name == "full":
        return FullCropPolicy(out_size)
    return CROP_POLICIES[name](out_size=out_size, scale=tuple(scale), **kwargs)
