"""SGCL's spatial-guided multi-crop (methods.md §1.8): the four position-fixed corner quadrants of a
patch (top-left, top-right, bottom-left, bottom-right; FiveCrop's centre crop is discarded), each
with its own local RandomResizedCrop (96 px, scale (0.2, 0.56)), flip and photometric jitter.
"""

from __future__ import annotations

import numpy as np

from sgcl.transforms.base import CropBox, ViewGeometry
from sgcl.transforms.views import ViewBuilder

QUADRANTS = ("tl", "tr", "bl", "br")


def quadrant_boxes(height: int, width: int) -> list[CropBox]:
    """The four corner boxes of side ``(width // 2, height // 2)``, ordered tl, tr, bl, br."""
    qw, qh = width // 2, height // 2
    return [CropBox(0, 0, qw, qh), CropBox(width - qw, 0, qw, qh), CropBox(0, height - qh, qw, qh),
            CropBox(width - qw, height - qh, qw, qh)]


class QuadrantMultiCrop:
    """``(patch, rng) -> [(view, geometry)] × 4`` in quadrant order; geometry in patch coordinates."""

    def __init__(self, local: ViewBuilder):
        self.local = local

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> list[tuple[np.ndarray, ViewGeometry]]:
        out = []
        for q in quadrant_boxes(img.shape[0], img.shape[1]):
            x0, y0, w, h = int(q.x0), int(q.y0), int(q.w), int(q.h)
            quadrant = img[y0:y0 + h, x0:x0 + w]
            out.append(self.local.view(quadrant, rng, offset=(x0, y0)))
        return out
