"""H&E-appropriate photometric augmentation on the CPU (numpy + OpenCV, no geometry change).

Every random draw comes from the ``numpy.random.Generator`` passed in, so a view is a pure function
of (patch, seed): resumed runs and any number of loader workers give identical views.

- colour jitter (brightness, contrast, saturation, hue; random order, probability ``p``);
- optional HED stain jitter: colour deconvolution into haematoxylin/eosin/DAB optical densities
  (Ruifrok & Johnston matrix), per-stain scale ``1±σ`` and shift ``±σ``, recomposition (Tellez et al.);
- greyscale with probability ``p_grey``; Gaussian blur σ ∈ [0.1, 2] with probability ``p_blur``.

With a ``regional`` jitter (IGU-Aug's adaptive jitter, ``sgcl.sampling.info_guided.InfoGuide``) and a
view's rendered guide, per-pixel brightness and contrast factor maps replace the brightness and
contrast draws of the colour jitter; everything else is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB) in optical density space.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class PhotometricParams:
    """Strengths of the photometric augmentations (the ``aug`` config section uses the same names)."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1            # fraction of the hue circle (SGCL reference: 0.4, very strong for H&E)
    p_jitter: float = 0.8
    hed_sigma: float = 0.0      # 0 = off; ~0.03-0.05 is a realistic stain variation
    p_hed: float = 0.5
    p_grey: float = 0.2
    p_blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)


def grey(img: np.ndarray) -> np.ndarray:
    """Luma (H, W) float32 of an RGB float32 image."""
    return img @ _GREY


def adjust_brightness(img: np.ndarray, f: float | np.ndarray) -> np.ndarray:
    """``img · f``; ``f`` a scalar or an (H, W, 1) per-pixel factor map."""
    return img * f


def adjust_contrast(img: np.ndarray, f: float | np.ndarray) -> np.ndarray:
    """``(img − m)·f + m`` around the image's mean grey ``m``; ``f`` a scalar or (H, W, 1) map."""
    mean = float(grey(img).mean())
    return (img - mean) * f + mean


def adjust_saturation(img: np.ndarray, f: float) -> np.ndarray:
    g = grey(img)[..., None]
    return (img - g) * f + g


def adjust_hue(img: np.ndarray, shift: float) -> np.ndarray:
    """Rotate hue by ``shift`` (fraction of the circle, in [-0.5, 0.5]) in 8-bit HSV (OpenCV's
    0-179 hue, as PIL/torchvision do for uint8 images)."""
    if shift == 0:
        return img
    u8 = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    hsv = cv2.cvtColor(u8, cv2.COLOR_RGB2HSV)
    steps = int(round(shift * 180.0))
    lut = ((np.arange(256, dtype=np.int32) + steps) % 180).astype(np.uint8)
    hsv[..., 0] = lut[hsv[..., 0]]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)


_OD_LUT = -np.log(np.maximum(np.arange(256, dtype=np.float32), 1.0) / 255.0)


def hed_jitter(img: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Scale (``alpha``, 3) and shift (``beta``, 3) the H, E, D optical densities of an RGB image.

    Optical density ``-ln(I/255)`` → stain densities (``HED_FROM_RGB``) → ``α·d + β`` → back."""
    if img.dtype == np.uint8:
        od = _OD_LUT[img]
    else:
        od = -np.log(np.maximum(img, 1.0) / 255.0, dtype=np.float32)
    # one 3x3 matrix and offset in OD space: od' = od·(H·diag(α)·R) + β·R
    m = (HED_FROM_RGB * alpha[None, :]) @ RGB_FROM_HED
    b = np.asarray(beta, dtype=np.float64) @ RGB_FROM_HED
    out = od.reshape(-1, 3) @ m.astype(np.float32) + b.astype(np.float32)
    return (np.exp(-out) * 255.0).reshape(img.shape).astype(np.float32)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    k = max(3, int(2 * round(3 * sigma) + 1))
    return cv2.GaussianBlur(img, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


class RegionalJitter(Protocol):
    """Per-pixel (brightness, contrast) factor maps (H, W) of a view from its rendered guide."""

    def factor_maps(self, guide: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]: ...


class PhotometricAugment:
    """Callable ``(uint8 RGB image, rng[, guide]) -> uint8 RGB image`` with the strengths of ``params``.

    With ``regional`` and a ``guide`` (the view's rendered guide), the colour jitter's brightness and
    contrast use ``regional.factor_maps`` instead of ``params.brightness`` / ``params.contrast``;
    without a guide (e.g. the local crops) the call is the plain one.
    """

    def __init__(self, params: PhotometricParams | None = None, regional: RegionalJitter | None = None):
        self.p = params or PhotometricParams()
        self.regional = regional

    def __call__(self, img: np.ndarray, rng: np.random.Generator, guide: np.ndarray | None = None) -> np.ndarray:
        p = self.p
        out = img.astype(np.float32)
        if p.hed_sigma > 0 and rng.random() < p.p_hed:
            alpha = rng.uniform(1 - p.hed_sigma, 1 + p.hed_sigma, 3)
            beta = rng.uniform(-p.hed_sigma, p.hed_sigma, 3)
            out = np.minimum(hed_jitter(img, alpha, beta), 255.0)
        if rng.random() < p.p_jitter:
            maps = None
            if self.regional is not None and guide is not None:
                maps = [m[..., None] for m in self.regional.factor_maps(guide, rng)]
            for op in rng.permutation(4):
                if op < 2 and maps is not None:
                    out = (adjust_brightness if op == 0 else adjust_contrast)(out, maps[op])
                elif op == 0 and p.brightness > 0:
                    out = adjust_brightness(out, rng.uniform(max(0, 1 - p.brightness), 1 + p.brightness))
                elif op == 1 and p.contrast > 0:
                    out = adjust_contrast(out, rng.uniform(max(0, 1 - p.contrast), 1 + p.contrast))
                elif op == 2 and p.saturation > 0:
                    out = adjust_saturation(out, rng.uniform(max(0, 1 - p.saturation), 1 + p.saturation))
                elif op == 3 and p.hue > 0:
                    out = adjust_hue(out, rng.uniform(-p.hue, p.hue))
                out = np.clip(out, 0, 255)
        if rng.random() < p.p_grey:
            out = np.repeat(grey(out)[..., None], 3, axis=2)
        if rng.random() < p.p_blur:
            out = gaussian_blur(out, rng.uniform(*p.blur_sigma))
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)
