"""PNG outputs: label masks (class indices, viewable with a palette), colour overlays, side-by-side panels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sgcl.utils.atomic import atomic_path

# background black, then distinct colours; 255 (ignore) grey
_PALETTE = np.array([(0, 0, 0), (0, 220, 0), (230, 25, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
                     (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)], dtype=np.uint8)


def class_colours(num: int = 256) -> np.ndarray:
    """(num, 3) uint8 colours per class index (255 = grey)."""
    reps = int(np.ceil(num / len(_PALETTE)))
    colours = np.tile(_PALETTE, (reps, 1))[:num].copy()
    if num > 255:
        colours[255] = (128, 128, 128)
    return colours


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W) or (H, W, 3) uint8 array as PNG atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
    return path


def save_mask_png(mask: np.ndarray, path: str | Path) -> Path:
    """Class-index PNG in palette mode: pixel values are the class indices, viewers show colours."""
    path = Path(path)
    im = Image.fromarray(np.ascontiguousarray(mask.astype(np.uint8)), mode="P")
    im.putpalette(class_colours(256).reshape(-1).tolist())
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
    return path


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45, outline: bool = True) -> np.ndarray:
    """RGB image with the foreground classes tinted (and outlined) in their colours."""
    colours = class_colours(256)
    out = image.astype(np.float32).copy()
    fg = (mask > 0) & (mask != 255)
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[mask[fg]].astype(np.float32)
    if outline:
        from skimage.segmentation import find_boundaries

        edge = find_boundaries(mask, mode="inner") & fg
        out[edge] = colours[mask[edge]]
    return out.round().clip(0, 255).astype(np.uint8)


def comparison_panel(image: np.ndarray, pred: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """image | prediction overlay [| target overlay], side by side with a white gutter."""
    panels = [image, overlay(image, pred)] + ([overlay(image, target)] if target is not None else [])
    gutter = np.full((image.shape[0], 4, 3), 255, np.uint8)
    parts = []
    for i, p in enumerate(panels):
        parts += ([gutter] if i else []) + [p]
    return np.concatenate(parts, 1)
