"""Per-slide QC pictures: thumbnail + tissue contour (green) + ROI outlines (magenta; excluded regions
orange) + kept patch grid (blue; flat, one-colour patches red) + a caption, and CLAM's "stitch" (the
kept patches on black). PNG or JPEG by the file's suffix. The thumbnail of a tiny slide is enlarged
(nearest neighbour) and the picture padded to ``QC_MIN_WIDTH`` so that the caption stays readable."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from sgcl.utils.atomic import atomic_path

if TYPE_CHECKING:
    from .geojson import Roi

TISSUE_COLOUR = (0, 170, 0)
PATCH_COLOUR = (30, 60, 230)
ROI_COLOUR = (230, 0, 230)
ROI_EXCLUDE_COLOUR = (255, 140, 0)
FLAT_COLOUR = (200, 0, 0)
QC_MIN_WIDTH = 480  # px: narrower pictures cut the caption to a few characters per line
QC_MAX_ENLARGED = 1024  # px: a tiny slide's thumbnail is enlarged at most to this longer side


def _enlarge_small(thumbnail: np.ndarray) -> np.ndarray:
    """A thumbnail narrower than ``QC_MIN_WIDTH`` enlarged by a whole factor (nearest neighbour, pixels stay
    sharp), its longer side kept within ``QC_MAX_ENLARGED``."""
    th, tw = thumbnail.shape[:2]
    factor = min(-(-QC_MIN_WIDTH // max(tw, 1)), max(1, QC_MAX_ENLARGED // max(th, tw, 1)))
    if factor <= 1:
        return thumbnail
    return cv2.resize(thumbnail, (tw * factor, th * factor), interpolation=cv2.INTER_NEAREST)


def render_qc(thumbnail: np.ndarray, level0_size: tuple[int, int], tissue_mask: np.ndarray | None,
              coords: np.ndarray, patch_size_level0: float, caption: str, roi: Roi | None = None,
              flat: np.ndarray | None = None) -> np.ndarray:
    """RGB picture of ``thumbnail`` (covering the whole slide) with the overlays and a caption bar, at least
    ``QC_MIN_WIDTH`` px wide. ``flat``: one bool per row of ``coords``, True for a flat patch (drawn red)."""
    img = np.ascontiguousarray(_enlarge_small(thumbnail).copy())
    th, tw = img.shape[:2]
    sx, sy = tw / level0_size[0], th / level0_size[1]
    line = max(1, round(max(th, tw) / 500))
    if roi is not None:
        for polygons, colour in ((roi.include, ROI_COLOUR), (roi.exclude, ROI_EXCLUDE_COLOUR)):
            rings = [np.round(r * (sx, sy)).astype(np.int32).reshape(-1, 1, 2) for poly in polygons for r in poly]
            cv2.polylines(img, rings, True, colour, line + 1)
    if tissue_mask is not None and tissue_mask.any():
        m = cv2.resize(tissue_mask.astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, TISSUE_COLOUR, line)
    coords = np.asarray(coords).reshape(-1, 2)
    flat = np.zeros(len(coords), bool) if flat is None else np.asarray(flat, bool)
    for (x, y), is_flat in zip(coords, flat):
        p0 = (int(round(x * sx)), int(round(y * sy)))
        p1 = (int(round((x + patch_size_level0) * sx)) - 1, int(round((y + patch_size_level0) * sy)) - 1)
        cv2.rectangle(img, p0, p1, FLAT_COLOUR if is_flat else PATCH_COLOUR, line + 1 if is_flat else 1)
    if tw < QC_MIN_WIDTH:  # a thin slide: pad on the right, so the caption has room
        img = np.concatenate([img, np.full((th, QC_MIN_WIDTH - tw, 3), 255, np.uint8)], axis=1)
        tw = QC_MIN_WIDTH
    font, fscale = cv2.FONT_HERSHEY_SIMPLEX, max(0.35, min(0.6, tw / 1400))
    lines = _wrap(caption, max(20, int(tw / (fscale * 20))))
    line_h = int(26 * fscale) + 6
    bar = np.full((line_h * len(lines) + 6, tw, 3), 255, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(bar, line, (4, line_h * (i + 1)), font, fscale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([img, bar], axis=0)


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(" "), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + [cur] if cur else lines


def render_stitch(thumbnail: np.ndarray, level0_size: tuple[int, int], coords: np.ndarray,
                  patch_size_level0: float) -> np.ndarray:
    """RGB picture of the kept patches only (the thumbnail's pixels under them) on black, like CLAM's stitches."""
    th, tw = thumbnail.shape[:2]
    sx, sy = tw / level0_size[0], th / level0_size[1]
    keep = np.zeros((th, tw), bool)
    for x, y in np.asarray(coords).reshape(-1, 2):
        x0, y0 = int(round(x * sx)), int(round(y * sy))
        keep[y0:max(y0 + 1, int(round((y + patch_size_level0) * sy))), x0:max(x0 + 1, int(round((x + patch_size_level0) * sx)))] = True
    out = np.zeros_like(thumbnail)
    out[keep] = thumbnail[keep]
    return out


def write_picture(path: str | Path, img: np.ndarray, jpeg_quality: int = 90) -> Path:
    """Write an RGB picture atomically, as PNG or JPEG by ``path``'s suffix; returns its path."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in (".png", ".jpg", ".jpeg"):
        raise ValueError(f"{path}: a QC picture is .png or .jpg")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if ext != ".png" else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError(f"{ext} encoding failed for {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())
    return path


def write_qc_png(path: str | Path, thumbnail: np.ndarray, level0_size: tuple[int, int], tissue_mask: np.ndarray | None,
                 coords: np.ndarray, patch_size_level0: float, caption: str, roi: Roi | None = None,
                 flat: np.ndarray | None = None) -> Path:
    """Render and write the QC picture atomically (PNG or JPEG by ``path``'s suffix); returns its path."""
    return write_picture(path, render_qc(thumbnail, level0_size, tissue_mask, coords, patch_size_level0, caption, roi,
                                         flat))
