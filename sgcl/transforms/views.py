"""Build a view from a patch with any ``CropPolicy``: cut, resize, flip, rotate, jitter — and record
its ``ViewGeometry`` so the view can be mapped back to source-patch pixels.

Pixel convention: output pixel centre ``u`` (0-based) of a view of box ``(x0, w)`` resized to ``out_w``
comes from source coordinate ``x0 + (u + 0.5)·w/out_w − 0.5`` (OpenCV's and PyTorch's
``align_corners=False`` convention), before flip and rotation.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np
import torch

from sgcl.transforms.base import CropBox, CropPolicy, ViewGeometry
from sgcl.transforms.geometry import render_view

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cut_and_resize(img: np.ndarray, box: CropBox, out_size: int | tuple[int, int] | None) -> np.ndarray:
    """The pixels of ``box`` resized to ``out_size`` (int = square, (w, h), or None = native)."""
    x0, y0, w, h = box.x0, box.y0, box.w, box.h
    integral = all(float(v).is_integer() for v in (x0, y0, w, h))
    if out_size is None:
        if not integral:
            raise ValueError(f"a native-size view needs an integer box, got {box}")
        out_w, out_h = int(w), int(h)
    elif isinstance(out_size, int):
        out_w = out_h = out_size
    else:
        out_w, out_h = out_size
    if integral:
        crop = img[int(y0):int(y0 + h), int(x0):int(x0 + w)]
        if crop.shape[0] != int(h) or crop.shape[1] != int(w):
            raise ValueError(f"crop box {box} exceeds the patch of {img.shape[1]}x{img.shape[0]} pixels")
        if (out_w, out_h) == (crop.shape[1], crop.shape[0]):
            return np.ascontiguousarray(crop)
        interp = cv2.INTER_AREA if out_w < w and out_h < h else cv2.INTER_LINEAR
        return cv2.resize(crop, (out_w, out_h), interpolation=interp)
    sx, sy = out_w / w, out_h / h
    m = np.array([[sx, 0, 0.5 * sx - 0.5 - x0 * sx], [0, sy, 0.5 * sy - 0.5 - y0 * sy]], dtype=np.float64)
    return cv2.warpAffine(img, m, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def flip_rotate(img: np.ndarray, hflip: bool, rot_k: int) -> np.ndarray:
    """Horizontal flip, then ``rot_k``·90° counter-clockwise (``np.rot90``)."""
    if hflip:
        img = img[:, ::-1]
    if rot_k % 4:
        img = np.rot90(img, rot_k % 4)
    return np.ascontiguousarray(img)


def make_view(img: np.ndarray, box: CropBox, out_size: int | None, hflip: bool = False, rot_k: int = 0,
              offset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, ViewGeometry]:
    """Cut ``box`` from ``img``, resize, flip, rotate. ``offset`` is added to the recorded box (a
    quadrant's origin in its patch), so the geometry is always in source-patch coordinates."""
    view = flip_rotate(cut_and_resize(img, box, out_size), hflip, rot_k)
    out_h, out_w = (view.shape[0], view.shape[1]) if rot_k % 2 == 0 else (view.shape[1], view.shape[0])
    geom = ViewGeometry(float(box.x0 + offset[0]), float(box.y0 + offset[1]), float(box.w), float(box.h),
                        int(out_w), int(out_h), bool(hflip), int(rot_k) % 4)
    return view, geom


def view_to_source(geom: ViewGeometry, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Source-patch coordinates of pixel centres ``(u, v)`` of the final (flipped, rotated) view."""
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    # undo the rotation: np.rot90 by k maps pre-rotation (x, y) in a W×H image as below
    w, h = geom.out_w, geom.out_h
    k = geom.rot_k % 4
    if k == 0:
        x, y = u, v
    elif k == 1:   # CCW: new(u, v) = old(x=w-1-v, y=u)
        x, y = w - 1 - v, u
    elif k == 2:
        x, y = w - 1 - u, h - 1 - v
    else:          # CW: new(u, v) = old(x=v, y=h-1-u)
        x, y = v, h - 1 - u
    if geom.hflip:
        x = w - 1 - x
    sx = geom.x0 + (x + 0.5) * geom.w / w - 0.5
    sy = geom.y0 + (y + 0.5) * geom.h / h - 0.5
    return sx, sy


def to_tensor(img: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD, normalize: bool = True) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W): float32 normalised, or uint8 unchanged when ``normalize=False``."""
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()
    if not normalize:
        return t
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (t.float().div_(255.0) - m) / s


class ViewBuilder:
    """Global views of a patch: ``policy`` crop + random flip + random 90° rotation + ``photometric``.

    A *guide* (an (H, W[, C]) float array aligned with the patch, e.g. IGU-Aug's entropy map) is
    rendered through each view's geometry (``geometry.render_view``) and handed to the photometric
    as ``photometric(view, rng, guide=...)``.
    """

    def __init__(self, policy: CropPolicy, photometric: Callable[..., np.ndarray] | None = None,
                 hflip_p: float = 0.5, rotate90: bool = True):
        self.policy = policy
        self.photometric = photometric
        self.hflip_p = hflip_p
        self.rotate90 = rotate90

    def _flip_rot(self, rng: np.random.Generator) -> tuple[bool, int]:
        hflip = bool(rng.random() < self.hflip_p)
        rot_k = int(rng.integers(0, 4)) if self.rotate90 else 0
        return hflip, rot_k

    def guided_view(self, img: np.ndarray, rng: np.random.Generator, box: CropBox | None = None,
                    offset: tuple[float, float] = (0.0, 0.0), guide: np.ndarray | None = None,
                    ) -> tuple[np.ndarray, ViewGeometry, np.ndarray | None]:
        """``(view, geometry, rendered guide or None)``."""
        box = box if box is not None else self.policy.sample(img.shape[0], img.shape[1], rng, img)
        hflip, rot_k = self._flip_rot(rng)
        view, geom = make_view(img, box, self.policy.out_size, hflip, rot_k, offset)
        guide_view = None if guide is None else render_view(guide, geom)
        if self.photometric is not None:
            view = self.photometric(view, rng) if guide_view is None else self.photometric(view, rng, guide=guide_view)
        return view, geom, guide_view

    def view(self, img: np.ndarray, rng: np.random.Generator, box: CropBox | None = None,
             offset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, ViewGeometry]:
        view, geom, _ = self.guided_view(img, rng, box, offset)
        return view, geom

    def guided_views(self, img: np.ndarray, rng: np.random.Generator, n: int, guide: np.ndarray | None = None,
                     ) -> list[tuple[np.ndarray, ViewGeometry, np.ndarray | None]]:
        """``n`` guided views; the first two boxes come from ``policy.sample_pair`` (policies may relate them)."""
        if n <= 0:
            return []
        if n == 1:
            return [self.guided_view(img, rng, guide=guide)]
        boxes = list(self.policy.sample_pair(img.shape[0], img.shape[1], rng, img))
        boxes += [self.policy.sample(img.shape[0], img.shape[1], rng, img) for _ in range(n - 2)]
        return [self.guided_view(img, rng, box, guide=guide) for box in boxes]

    def views(self, img: np.ndarray, rng: np.random.Generator, n: int) -> list[tuple[np.ndarray, ViewGeometry]]:
        """``n`` views (see ``guided_views``)."""
        return [(v, g) for v, g, _ in self.guided_views(img, rng, n)]
