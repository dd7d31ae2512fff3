"""Scale-aware small-window crops (methods.md §2): zoom in on small, sparse structures.

``SmallWindowCrop`` is a :class:`~sgcl.transforms.base.CropPolicy`. The window side is
``s = ρ·L`` (``L`` = the reference crop side, e.g. 224), optionally jittered by ±``size_jitter``.

- placement ``random``: every view's corner is uniform over the valid area;
  ``proximity``: view 2's centre = view 1's centre + δ, δ ~ U([−κ·s, κ·s]²), clamped into the
  patch. With κ = 0.5 the two windows overlap by at least 25 % of the smaller window's area
  (clamping only moves view 2 towards view 1, so the bound survives it).
- resolution ``native`` (``out_size = None``): the s × s window is fed as is — ρ² fewer pixels,
  the fast mode; ``zoom``: the window is resized to L × L (``out_size = L``).
- windows nearly empty of tissue are rejected (grey-level standard deviation below ``min_std``
  or tissue fraction below ``min_tissue``), with at most ``max_tries`` draws; after that the
  best window seen is returned, so sampling never loops forever on a blank patch.

Used as the global crop of SGCL / MoCo v2 / SimCLR (in place of RandomResizedCrop) and as the
local crops of multi-crop (``sample`` once per local crop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from sgcl.config import ConfigError, bounded
from sgcl.transforms.base import CropBox

RHO_CHOICES = (1.0, 0.5, 0.25, 0.125)


@dataclass(frozen=True)
class WindowScore:
    """Tissue evidence of a window: grey std (0–255 scale) and fraction of tissue pixels."""

    std: float
    tissue: float


def window_score(image: np.ndarray, box: CropBox, background: int = 220, max_side: int = 32) -> WindowScore:
    """Grey-level std and tissue fraction of ``image[box]``, on a strided subsample of ≤ ``max_side``²
    pixels (cheap enough to run per view). Tissue = darker than ``background`` (white glass is
    ~235–255 on H&E)."""
    x0, y0, w, h = int(box.x0), int(box.y0), max(1, int(round(box.w))), max(1, int(round(box.h)))
    step = max(1, max(w, h) // max_side)
    win = image[y0 : y0 + h : step, x0 : x0 + w : step]
    if win.ndim == 3:
        grey = win[..., :3].astype(np.float32).mean(axis=-1) if win.shape[-1] >= 3 else win[..., 0].astype(np.float32)
    else:
        grey = win.astype(np.float32)
    if grey.size == 0:
        return WindowScore(0.0, 0.0)
    return WindowScore(float(grey.std()), float((grey < background).mean()))


@dataclass
class SmallWindowCrop:
    """Small-window crop policy (see the module docstring). ``size`` is the reference side L."""

    rho: float = 0.25
    size: int = 224
    placement: Literal["random", "proximity"] = "random"
    resolution: Literal["native", "zoom"] = "native"
    kappa: float = 0.5
    size_jitter: float = 0.0
    min_std: float = 0.0
    min_tissue: float = 0.0
    background: int = 220
    max_tries: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"SmallWindowCrop: rho={self.rho} must be in (0, 1] (typical: {RHO_CHOICES})")
        if self.size < 1:
            raise ValueError(f"SmallWindowCrop: size={self.size} must be a positive reference crop side in pixels")
        if self.placement not in ("random", "proximity"):
            raise ValueError(f"SmallWindowCrop: placement={self.placement!r} must be 'random' or 'proximity'")
        if self.resolution not in ("native", "zoom"):
            raise ValueError(f"SmallWindowCrop: resolution={self.resolution!r} must be 'native' or 'zoom'")
        if not 0.0 <= self.kappa <= 1.0:
            raise ValueError(f"SmallWindowCrop: kappa={self.kappa} must be in [0, 1] (0.5 guarantees >= 25 % overlap)")
        if not 0.0 <= self.size_jitter < 1.0:
            raise ValueError(f"SmallWindowCrop: size_jitter={self.size_jitter} must be in [0, 1)")
        if self.max_tries < 1:
            raise ValueError("SmallWindowCrop: max_tries must be >= 1")
        if self.resolution == "native" and self.size_jitter > 0:
            raise ValueError("SmallWindowCrop: native resolution with size_jitter > 0 gives views of different sizes "
                             "that cannot be batched; use resolution='zoom' or size_jitter=0")

    @property
    def out_size(self) -> int | None:
        """``None`` in native mode (keep the window as is), ``L`` in zoom mode."""
        return None if self.resolution == "native" else self.size

    @property
    def window(self) -> int:
        """Nominal window side ``round(ρ·L)`` (before jitter)."""
        return max(1, int(round(self.rho * self.size)))

    # -- drawing ---------------------------------------------------------------------------
    def _side(self, height: int, width: int, rng: np.random.Generator) -> int:
        s = self.rho * self.size
        if self.size_jitter > 0:
            s *= 1.0 + rng.uniform(-self.size_jitter, self.size_jitter)
        return int(min(max(1, round(s)), height, width))

    @staticmethod
    def _random_box(side: int, height: int, width: int, rng: np.random.Generator) -> CropBox:
        x0 = int(rng.integers(0, width - side + 1))
        y0 = int(rng.integers(0, height - side + 1))
        return CropBox(float(x0), float(y0), float(side), float(side))

    def _near_box(self, first: CropBox, side: int, height: int, width: int, rng: np.random.Generator) -> CropBox:
        # integer centre offset |δ| <= floor(κ·min side): the overlap bound holds exactly in pixels
        reach = int(np.floor(self.kappa * min(first.w, side)))
        dx, dy = (int(v) for v in rng.integers(-reach, reach + 1, size=2))
        shift = (int(first.w) - side) // 2
        x0 = int(np.clip(int(first.x0) + shift + dx, 0, width - side))
        y0 = int(np.clip(int(first.y0) + shift + dy, 0, height - side))
        return CropBox(float(x0), float(y0), float(side), float(side))

    def _filtering(self, image: np.ndarray | None) -> bool:
        return image is not None and (self.min_std > 0 or self.min_tissue > 0)

    def _ok(self, s: WindowScore) -> bool:
        return s.std >= self.min_std and s.tissue >= self.min_tissue

    def _score(self, image: np.ndarray, box: CropBox) -> WindowScore:
        return window_score(image, box, self.background)

    @staticmethod
    def _check(height: int, width: int, image: np.ndarray | None) -> None:
        if height < 1 or width < 1:
            raise ValueError(f"SmallWindowCrop: source patch of {height}x{width} pixels is empty")
        if image is not None and tuple(image.shape[:2]) != (height, width):
            raise ValueError(f"SmallWindowCrop: image shape {image.shape[:2]} does not match {height}x{width}")

    def sample(self, height: int, width: int, rng: np.random.Generator, image: np.ndarray | None = None) -> CropBox:
        """One window (e.g. a multi-crop local crop); tissue-rejected when ``image`` is given."""
        self._check(height, width, image)
        best, best_key = None, None
        for _ in range(self.max_tries if self._filtering(image) else 1):
            box = self._random_box(self._side(height, width, rng), height, width, rng)
            if not self._filtering(image):
                return box
            sc = self._score(image, box)
            if self._ok(sc):
                return box
            key = (sc.tissue, sc.std)
            if best_key is None or key > best_key:
                best, best_key = box, key
        return best

    def sample_pair(self, height: int, width: int, rng: np.random.Generator, image: np.ndarray | None = None) -> tuple[CropBox, CropBox]:
        """Two windows: independent (``random``) or view 2 placed near view 1 (``proximity``)."""
        self._check(height, width, image)
        if self.placement == "random":
            return self.sample(height, width, rng, image), self.sample(height, width, rng, image)
        first = self.sample(height, width, rng, image)
        best, best_key = None, None
        for _ in range(self.max_tries if self._filtering(image) else 1):
            second = self._near_box(first, self._side(height, width, rng), height, width, rng)
            if not self._filtering(image):
                return first, second
            sc = self._score(image, second)
            if self._ok(sc):
                return first, second
            key = (sc.tissue, sc.std)
            if best_key is None or key > best_key:
                best, best_key = second, key
        return first, best


def overlap_fraction(a: CropBox, b: CropBox) -> float:
    """Intersection area over the smaller box's area."""
    ix = max(0.0, min(a.x0 + a.w, b.x0 + b.w) - max(a.x0, b.x0))
    iy = max(0.0, min(a.y0 + a.h, b.y0 + b.h) - max(a.y0, b.y0))
    return ix * iy / min(a.w * a.h, b.w * b.h)


@dataclass
class SmallWindowConfig:
    """The ``aug.small_window`` section of a pretraining config (used when ``aug.crop=small_window``
    for the global views, and/or ``aug.local_crop=small_window`` for the multi-crop local views;
    ``L`` is ``aug.global_size`` resp. ``aug.local_size``)."""

    rho: float = bounded(0.25, gt=0, le=1)  # window side = rho · L (typical 1, 0.5, 0.25, 0.125)
    placement: Literal["random", "proximity"] = "proximity"
    resolution: Literal["native", "zoom"] = "native"
    kappa: float = bounded(0.5, ge=0, le=1)  # proximity: centre offset up to kappa · window side (0.5: >= 25 % overlap)
    size_jitter: float = bounded(0.0, ge=0, lt=1)  # window side jittered by ± this fraction (zoom resolution only)
    min_std: float = bounded(0.0, ge=0)  # reject windows whose grey std (0-255) is below this
    min_tissue: float = bounded(0.0, ge=0, le=1)  # reject windows with a smaller tissue fraction
    background: int = bounded(220, ge=0, le=255)  # grey level above which a pixel is glass, not tissue
    max_tries: int = bounded(10, ge=1)  # draws before the best window seen is kept

    def validate(self) -> None:
        """size_jitter > 0 needs resolution=zoom (native windows of different sizes cannot be batched)."""
        if self.resolution == "native" and self.size_jitter > 0:
            raise ConfigError(f"size_jitter: {self.size_jitter} needs resolution=zoom (native windows of different "
                              "sizes cannot be batched); set size_jitter=0 or resolution=zoom", key="size_jitter")


def small_window_policy(out_size: int | None, scale=None, **options) -> SmallWindowCrop:  # noqa: ANN001
    """Factory for ``sgcl.transforms.crops.build_crop_policy``: ``out_size`` is the reference side L
    (``scale`` belongs to RandomResizedCrop and is ignored); ``options`` = ``SmallWindowConfig`` fields."""
    if out_size is None:
        raise ValueError("the small-window crop needs a reference size L (aug.global_size / aug.local_size)")
    return SmallWindowCrop(size=int(out_size), **options)
