"""Sliding-window inference stitched over images larger than the model's window, and over
whole-slide regions read through the tiling stage's readers (methods.md §2.2 step 8).

- Windows of ``window`` px with stride ``window·(1 − overlap)``; the last window of each row/column
  is aligned to the border, so every pixel is covered.
- Borders are reflect-padded by half the overlap, so edge pixels see context rather than the edge of a window.
- Each window's output is weighted by a 2-D Gaussian (σ = window/8) or uniformly, accumulated,
  and divided by the accumulated weights. For a translation-equivariant model the result equals
  one forward pass over the whole image (tested).
- :func:`predict_slide_region` reads a level-0 box of a slide at the model's µm/px. Its windows form
  one global grid over the region; the region is computed in bounded tiles, each from exactly the
  global windows overlapping it (real slide pixels as context), so the result is independent of the
  tiling (no tile seams) while memory stays bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

ModelFn = Callable[[torch.Tensor], torch.Tensor]
Weighting = Literal["gaussian", "uniform"]


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    h, w = value
    return int(h), int(w)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering ``[0, length)``; the last one ends exactly at ``length``."""
    if window <= 0 or stride <= 0:
        raise ValueError(f"window ({window}) and stride ({stride}) must be positive")
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


@dataclass(frozen=True)
class WindowGrid:
    """Where the windows of one image go: padding (left, right, top, bottom) and window corners (y, x)
    in the padded image."""

    pad: tuple[int, int, int, int]
    boxes: list[tuple[int, int]]
    padded_shape: tuple[int, int]


def window_grid(height: int, width: int, window: int | Sequence[int], overlap: float = 0.5) -> WindowGrid:
    """Reflect padding of half the overlap on every side (more where the image is smaller than a
    window), then windows at stride ``window·(1 − overlap)`` covering every pixel."""
    wh, ww = _pair(window)
    sh, sw = max(1, int(round(wh * (1 - overlap)))), max(1, int(round(ww * (1 - overlap))))
    top, left = (wh - sh) // 2, (ww - sw) // 2
    bottom = top + max(0, wh - (height + 2 * top))
    right = left + max(0, ww - (width + 2 * left))
    ph, pw = height + top + bottom, width + left + right
    boxes = [(y, x) for y in window_starts(ph, wh, sh) for x in window_starts(pw, ww, sw)]
    return WindowGrid((left, right, top, bottom), boxes, (ph, pw))


def window_weights(window: int | Sequence[int], weighting: Weighting = "gaussian", sigma_scale: float = 1 / 8) -> torch.Tensor:
    """(h, w) float32 weights: a separable Gaussian with σ = sigma_scale·size (peak 1), or ones."""
    h, w = _pair(window)
    if weighting == "uniform":
        return torch.ones(h, w)
    if weighting != "gaussian":
        raise ValueError(f"weighting must be 'gaussian' or 'uniform', got {weighting!r}")

    def _g(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        return torch.exp(-0.5 * (x / (sigma_scale * n)) ** 2)

    weights = torch.outer(_g(h), _g(w))
    return weights.clamp_min(1e-6).float()  # never exactly 0: every pixel keeps a defined average


def _to_chw_float(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W, C) uint8 (scaled to [0, 1]) or float array -> (C, H, W) float32 tensor."""
    if isinstance(image, torch.Tensor):
        arr = image
    else:
        image = np.ascontiguousarray(image)
        arr = torch.from_numpy(image if image.flags.writeable else image.copy())
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"image must be (H, W, C) or (H, W); got shape {tuple(arr.shape)}")
    scale = 255.0 if arr.dtype == torch.uint8 else 1.0
    return arr.permute(2, 0, 1).float().div_(scale) if scale != 1.0 else arr.permute(2, 0, 1).float()


@torch.inference_mode()
def sliding_window_predict(
    model_fn: ModelFn,
    image: np.ndarray | torch.Tensor,
    window: int | Sequence[int],
    overlap: float = 0.5,
    weighting: Weighting = "gaussian",
    batch_size: int = 8,
    device: str | torch.device | None = None,
    pad_mode: str = "reflect",
    progress: bool = False,
) -> np.ndarray:
    """Stitched ``model_fn`` output over an (H, W, C) image: (K, H, W) float32.

    ``model_fn`` maps a float batch (B, C, h, w) (uint8 images are scaled to [0, 1]) to (B, K, h, w),
    e.g. softmax probabilities. ``overlap`` in [0, 1) is the fraction shared by neighbouring windows.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    wh, ww = _pair(window)
    device = torch.device(device) if device is not None else torch.device("cpu")
    img = _to_chw_float(image)
    _, height, width = img.shape
    if height == 0 or width == 0:
        raise ValueError("image is empty")
    grid = window_grid(height, width, (wh, ww), overlap)
    top, left = grid.pad[2], grid.pad[0]
    if any(grid.pad):
        img = _pad(img, grid.pad, pad_mode if min(height, width) > 1 else "replicate")
    weights = window_weights((wh, ww), weighting).to(device)
    out, norm = _accumulate(model_fn, img, grid.boxes, (wh, ww), weights, batch_size, device, progress)
    out /= norm
    return out[:, top:top + height, left:left + width].cpu().numpy()


def _accumulate(model_fn: ModelFn, img: torch.Tensor, boxes: Sequence[tuple[int, int]], window: tuple[int, int],
                weights: torch.Tensor, batch_size: int, device: torch.device, progress: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of ``model_fn`` over the windows at ``boxes`` (y, x) of ``img`` (C, H, W), and the
    summed weights: ``(out (K, H, W), norm (H, W))``."""
    wh, ww = window
    _, ph, pw = img.shape
    out: torch.Tensor | None = None
    norm = torch.zeros(ph, pw, device=device)
    bar = tqdm(total=len(boxes), desc="windows", unit="win", disable=not progress, leave=False)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        batch = torch.stack([img[:, y:y + wh, x:x + ww] for y, x in chunk]).to(device)
        pred = model_fn(batch)
        if pred.ndim != 4 or pred.shape[0] != len(chunk) or tuple(pred.shape[2:]) != (wh, ww):
            raise ValueError(f"model_fn returned shape {tuple(pred.shape)}; expected ({len(chunk)}, K, {wh}, {ww})")
        if out is None:
            out = torch.zeros(pred.shape[1], ph, pw, device=device)
        pred = pred.float() * weights
        for (y, x), p in zip(chunk, pred):
            out[:, y:y + wh, x:x + ww] += p
            norm[y:y + wh, x:x + ww] += weights
        bar.update(len(chunk))
    bar.close()
    assert out is not None, "no windows"
    return out, norm


def _pad(img: torch.Tensor, pad: tuple[int, int, int, int], mode: str) -> torch.Tensor:
    """Pad (C, H, W) by (left, right, top, bottom); reflect repeatedly where pad exceeds the size."""
    if mode != "reflect":
        return torch.nn.functional.pad(img[None], pad, mode=mode)[0]
    left, right, top, bottom = pad
    while left or right or top or bottom:  # torch reflect needs pad < size: grow in steps
        _, h, w = img.shape
        step = (min(left, w - 1), min(right, w - 1), min(top, h - 1), min(bottom, h - 1))
        img = torch.nn.functional.pad(img[None], step, mode="reflect")[0]
        left, right, top, bottom = (a - b for a, b in zip((left, right, top, bottom), step))
    return img


# ---------------------------------------------------------------------------------------------
# whole-slide regions


@dataclass
class RegionPrediction:
    """A stitched prediction over a slide region, at the model's µm/px."""

    mask: np.ndarray  # (h, w) uint8 class indices
    image: np.ndarray  # (h, w, 3) uint8, the region as the model saw it
    mpp: float  # µm/px of mask and image
    scale: float  # level-0 pixels per output pixel
    region: tuple[int, int, int, int]  # level-0 x0, y0, w, h
    level: int  # slide level read
    probs: np.ndarray | None = None  # (K, h, w) float32 when asked for
    info: dict = field(default_factory=dict)


def _grid_range(start: int, length: int, total: int, window: int, stride: int, pad: int) -> tuple[int, int]:
    """Indices k0..k1 of the global windows (origin −pad + k·stride) that overlap ``[start, start+length)``
    of an axis of ``total`` output pixels."""
    k_last = max(0, math.ceil((total + pad - window) / stride))  # the last window reaches the end
    k0 = max(0, (start + pad - window) // stride + 1)
    k1 = min(k_last, (start + length - 1 + pad) // stride)
    return k0, k1


@torch.inference_mode()
def predict_slide_region(
    model_fn: ModelFn,
    slide_path: str | Path,
    x0: int,
    y0: int,
    w: int,
    h: int,
    mpp: float,
    window: int = 256,
    overlap: float = 0.5,
    weighting: Weighting = "gaussian",
    batch_size: int = 8,
    tile_size: int = 2048,
    slide_mpp: float | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    return_probs: bool = False,
) -> RegionPrediction:
    """Predict the level-0 box (x0, y0, w, h) of a slide at ``mpp`` µm/px (the model's scale).

    The windows form one global grid over the region (origin half an overlap before it, stride
    ``window·(1 − overlap)``, real slide pixels as context beyond the region's edges). The output is
    computed in tiles of about ``tile_size`` px (a multiple of the stride), each from exactly the global
    windows that overlap it, read from the best pyramid level and resized to ``mpp``: memory stays
    bounded for any region, and the stitched result does not depend on the tiling (no tile seams).
    ``slide_mpp`` overrides the slide header (needed for slides without µm/px).
    """
    from .slide_source import open_region_source

    if w <= 0 or h <= 0:
        raise ValueError(f"region size must be positive, got w={w}, h={h}")
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    import cv2

    wh, ww = _pair(window)
    sh, sw = max(1, int(round(wh * (1 - overlap)))), max(1, int(round(ww * (1 - overlap))))
    pad_y, pad_x = (wh - sh) // 2, (ww - sw) // 2
    tile_h, tile_w = max(sh, tile_size // sh * sh), max(sw, tile_size // sw * sw)
    device = torch.device(device) if device is not None else torch.device("cpu")
    weights = window_weights((wh, ww), weighting).to(device)
    with open_region_source(slide_path, slide_mpp) as source:
        scale = mpp / source.mpp  # level-0 px per output px
        out_w, out_h = max(1, int(round(w / scale))), max(1, int(round(h / scale)))
        level = source.best_level(scale)
        ds = source.downsample(level)
        mask = np.zeros((out_h, out_w), np.uint8)
        rgb = np.zeros((out_h, out_w, 3), np.uint8)
        probs_out: np.ndarray | None = None
        tiles = [(ty, tx) for ty in range(0, out_h, tile_h) for tx in range(0, out_w, tile_w)]
        windows = 0
        for ty, tx in tqdm(tiles, desc=f"{Path(slide_path).name} tiles", unit="tile", disable=not progress):
            th, tw = min(tile_h, out_h - ty), min(tile_w, out_w - tx)
            ky0, ky1 = _grid_range(ty, th, out_h, wh, sh, pad_y)
            kx0, kx1 = _grid_range(tx, tw, out_w, ww, sw, pad_x)
            by0, bx0 = ky0 * sh - pad_y, kx0 * sw - pad_x  # box of the tile's windows, output px
            bh, bw = (ky1 - ky0) * sh + wh, (kx1 - kx0) * sw + ww
            lw, lh = max(1, math.ceil(bw * scale / ds)), max(1, math.ceil(bh * scale / ds))
            patch = source.read(int(round(x0 + bx0 * scale)), int(round(y0 + by0 * scale)), level, lw, lh)
            if patch.shape[:2] != (bh, bw):
                patch = cv2.resize(patch, (bw, bh), interpolation=cv2.INTER_AREA if lw > bw else cv2.INTER_LINEAR)
            boxes = [(ky * sh - pad_y - by0, kx * sw - pad_x - bx0)
                     for ky in range(ky0, ky1 + 1) for kx in range(kx0, kx1 + 1)]
            windows += len(boxes)
            acc, norm = _accumulate(model_fn, _to_chw_float(patch), boxes, (wh, ww), weights, batch_size, device)
            oy, ox = ty - by0, tx - bx0
            tile_probs = (acc[:, oy:oy + th, ox:ox + tw] / norm[oy:oy + th, ox:ox + tw]).cpu().numpy()
            mask[ty:ty + th, tx:tx + tw] = tile_probs.argmax(0).astype(np.uint8)
            rgb[ty:ty + th, tx:tx + tw] = patch[oy:oy + th, ox:ox + tw]
            if return_probs:
                if probs_out is None:
                    probs_out = np.zeros((tile_probs.shape[0], out_h, out_w), np.float32)
                probs_out[:, ty:ty + th, tx:tx + tw] = tile_probs
        info = {"slide": str(slide_path), "slide_mpp": source.mpp, "slide_mpp_source": source.mpp_source,
                "reader": source.reader_name, "tiles": len(tiles), "windows": windows}
    return RegionPrediction(mask=mask, image=rgb, mpp=float(mpp), scale=float(scale),
                            region=(int(x0), int(y0), int(w), int(h)), level=int(level), probs=probs_out, info=info)
