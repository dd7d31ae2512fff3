"""Crop policies and the geometry record that ties a view back to the source patch.

A view is made as: ``box = policy.sample(H, W, rng)`` -> crop ``img[y0:y0+h, x0:x0+w]`` ->
resize to ``out_size`` (or keep native) -> optional horizontal flip -> rotation by ``k``·90°
(counter-clockwise, ``np.rot90`` convention) -> photometric jitter (no geometry change).

``ViewGeometry`` records exactly that, so a dense objective can map a pixel of one view's
feature map back to source-patch coordinates and find the corresponding pixel in the other view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class CropBox:
    x0: float
    y0: float
    w: float
    h: float


@dataclass(frozen=True)
class ViewGeometry:
    """Source-patch box of a view, its output size, flip and rotation.

    As a tensor row (``to_array``): ``[x0, y0, w, h, out_w, out_h, hflip, rot_k]``.
    """

    x0: float
    y0: float
    w: float
    h: float
    out_w: int
    out_h: int
    hflip: bool = False
    rot_k: int = 0

    def to_array(self) -> np.ndarray:
        return np.array([self.x0, self.y0, self.w, self.h, self.out_w, self.out_h, float(self.hflip), self.rot_k], np.float32)

    @staticmethod
    def from_array(a) -> "ViewGeometry":
        a = [float(v) for v in a]
        return ViewGeometry(a[0], a[1], a[2], a[3], int(a[4]), int(a[5]), bool(a[6]), int(a[7]) % 4)


class CropPolicy(Protocol):
    """Chooses a crop box in a source patch of ``height`` × ``width`` pixels.

    ``out_size`` is the side the crop is resized to, or ``None`` to keep it at native size.
    ``sample_pair`` lets a policy place the second view relative to the first (e.g. proximity).
    """

    out_size: int | None

    def sample(self, height: int, width: int, rng: np.random.Generator, image: np.ndarray | None = None) -> CropBox: ...

    def sample_pair(self, height: int, width: int, rng: np.random.Generator, image: np.ndarray | None = None) -> tuple[CropBox, CropBox]: ...
