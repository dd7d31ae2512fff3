"""Per-patch scores drawn on a slide: score maps, colouring, blending, a colour bar, the top-k patches
as QuPath GeoJSON and a gallery of the top and bottom patches. Pure functions over arrays; the command
(``sgcl heatmap``) is :mod:`evaluation.heatmap_cli`.

Geometry: ``coords`` are level-0 top-left ``(x, y)`` of each patch and ``size0`` the patch side in level-0
px; a picture of the slide at ``downsample`` (level-0 px per picture px) has pixel ``(i, j)`` covering
level-0 ``[j·ds, (j+1)·ds) × [i·ds, (i+1)·ds)``. A patch covers the picture pixels whose centre lies in its
footprint (at least one pixel).
"""

from __future__ import annotations

from typing import Literal, Sequence

import cv2
import numpy as np

Normalize = Literal["raw", "minmax", "percentile"]
NORMALIZE: tuple[str, ...] = ("raw", "minmax", "percentile")
COLORBAR_HEIGHT = 44  # px of the colour-bar strip under the blended picture
SEAM_PX = 1.0  # level-0 px added to a footprint in the picture (closes sub-pixel seams)
TOP_COLOUR = (220, 30, 30)
BOTTOM_COLOUR = (30, 90, 220)


class HeatmapError(ValueError):
    """Inputs that cannot be drawn (the message names the file and the fix)."""


# -- scores ---------------------------------------------------------------------------------------
def normalize_scores(scores: np.ndarray, mode: Normalize = "percentile") -> np.ndarray:
    """``raw`` (as given), ``minmax`` (to [0, 1]) or ``percentile`` (the rank of each score among all,
    in [0, 1], ties sharing their mean rank; CLAM's default). NaN stays NaN; float64."""
    s = np.asarray(scores, np.float64).reshape(-1)
    if mode == "raw":
        return s.copy()
    out = np.full(s.shape, np.nan)
    ok = np.isfinite(s)
    v = s[ok]
    if v.size == 0:
        return out
    if mode == "minmax":
        lo, hi = float(v.min()), float(v.max())
        out[ok] = (v - lo) / (hi - lo) if hi > lo else 0.5
    elif mode == "percentile":
        if v.size == 1:
            out[ok] = 0.5
        else:
            order = np.argsort(v, kind="stable")
            ranks = np.empty(v.size)
            ranks[order] = np.arange(v.size, dtype=np.float64)
            _, inverse = np.unique(v, return_inverse=True)  # ties: mean rank
            ranks = (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]
            out[ok] = ranks / (v.size - 1)
    else:
        raise HeatmapError(f"unknown normalize {mode!r}; choose one of {', '.join(NORMALIZE)}")
    return out


# -- geometry -------------------------------------------------------------------------------------
def footprint_boxes(coords: np.ndarray, size0: float, downsample: float, shape: tuple[int, int]) -> np.ndarray:
    """(N, 4) int ``x0, y0, x1, y1`` (end-exclusive, clipped to ``shape`` = (h, w)) of each patch in a
    picture at ``downsample``: the pixels whose centre is in the footprint, at least one. The footprint is
    widened by one level-0 px (``SEAM_PX``) so that a fractional stride (e.g. 224.45 level-0 px between
    224-px patches, as the tiler makes at 0.499 µm/px) leaves no empty picture row between neighbours."""
    c = np.asarray(coords, np.float64).reshape(-1, 2)
    lo = np.round(c / downsample).astype(np.int64)  # first centre (j + 0.5)·ds ≥ x  <=>  j ≥ x/ds - 0.5
    hi = np.round((c + size0 + SEAM_PX) / downsample).astype(np.int64)
    hi = np.maximum(hi, lo + 1)
    h, w = shape
    x0, x1 = np.clip(lo[:, 0], 0, w), np.clip(hi[:, 0], 0, w)
    y0, y1 = np.clip(lo[:, 1], 0, h), np.clip(hi[:, 1], 0, h)
    return np.stack([x0, y0, x1, y1], axis=1)


def _accumulate(boxes: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Sum and count of ``values`` over the boxes, per pixel (a 2-D difference array: O(N + pixels))."""
    h, w = shape
    diff_s = np.zeros((h + 1, w + 1))
    diff_n = np.zeros((h + 1, w + 1))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & np.isfinite(values)
    b, v = boxes[keep], values[keep]
    for diff, val in ((diff_s, v), (diff_n, np.ones_like(v))):
        np.add.at(diff, (b[:, 1], b[:, 0]), val)
        np.add.at(diff, (b[:, 1], b[:, 2]), -val)
        np.add.at(diff, (b[:, 3], b[:, 0]), -val)
        np.add.at(diff, (b[:, 3], b[:, 2]), val)
    return diff_s.cumsum(0).cumsum(1)[:h, :w], np.rint(diff_n.cumsum(0).cumsum(1)[:h, :w])


def half_shifted_coords(coords: np.ndarray, size0: float) -> np.ndarray:
    """The patch origins of the grid shifted by half a patch right, down and both (duplicates and the
    given origins removed), i.e. the extra patches of a stride of half the patch size."""
    c = np.asarray(coords, np.float64).reshape(-1, 2)
    h = size0 / 2.0
    shifted = np.concatenate([c + (h, 0.0), c + (0.0, h), c + (h, h)])
    quantum = max(h / 4.0, 1e-9)  # origins closer than an eighth of a patch are the same patch
    own = set(map(tuple, np.round(c / quantum).astype(np.int64).tolist()))
    seen, out = set(), []
    for p, k in zip(shifted, map(tuple, np.round(shifted / quantum).astype(np.int64).tolist())):
        if k not in own and k not in seen:
            seen.add(k)
            out.append(p)
    return np.asarray(out, np.float64).reshape(-1, 2)


def score_map(coords: np.ndarray, scores: np.ndarray, size0: float, downsample: float, shape: tuple[int, int],
              refine: bool = False) -> np.ndarray:
    """(h, w) float map: each pixel is the mean score of the patches covering it, NaN where none does.

    ``refine``: overlapping-patch refinement by interpolation. The patches of the half-stride grid
    (:func:`half_shifted_coords`) are added, each scored with the mean of the map over its footprint
    (i.e. of the patches it overlaps, by overlap area); each pixel is then the mean of all patches covering
    it, original and shifted, and pixels no original patch covers stay NaN. No new patch is read or scored.
    """
    s = np.asarray(scores, np.float64).reshape(-1)
    boxes = footprint_boxes(coords, size0, downsample, shape)
    total, count = _accumulate(boxes, s, shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        base = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    if not refine or len(s) == 0:
        return base
    covered = count > 0
    extra = half_shifted_coords(coords, size0)
    if len(extra) == 0:
        return base
    eboxes = footprint_boxes(extra, size0, downsample, shape)
    # mean of the base map over each shifted footprint, with integral images of the covered part
    h, w = shape
    integ_v = np.zeros((h + 1, w + 1))
    integ_n = np.zeros((h + 1, w + 1))
    integ_v[1:, 1:] = np.where(covered, base, 0.0).cumsum(0).cumsum(1)
    integ_n[1:, 1:] = covered.astype(np.float64).cumsum(0).cumsum(1)
    x0, y0, x1, y1 = eboxes.T
    sum_v = integ_v[y1, x1] - integ_v[y0, x1] - integ_v[y1, x0] + integ_v[y0, x0]
    sum_n = integ_n[y1, x1] - integ_n[y0, x1] - integ_n[y1, x0] + integ_n[y0, x0]
    with np.errstate(invalid="ignore", divide="ignore"):
        escores = np.where(sum_n > 0.5, sum_v / np.maximum(sum_n, 1e-12), np.nan)
    t2, n2 = _accumulate(eboxes, escores, shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        refined = (total + t2) / np.maximum(count + n2, 1)
    return np.where(covered, refined, np.nan)


# -- colour ---------------------------------------------------------------------------------------
def colormap_lut(name: str) -> np.ndarray:
    """(256, 3) uint8 RGB of a matplotlib colour map (``jet``, ``coolwarm``, ``viridis``, ...)."""
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        raise HeatmapError(f"unknown colour map {name!r}; use a matplotlib name such as jet, coolwarm, "
                           "viridis, inferno, RdBu_r") from None
    return np.round(cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def blend(thumbnail: np.ndarray, values: np.ndarray, lut: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5,
          threshold: float | None = None) -> np.ndarray:
    """``thumbnail`` (h, w, 3) uint8 with ``values`` (h, w; NaN = no patch) coloured through ``lut`` on
    [vmin, vmax] and blended at ``alpha``; pixels below ``threshold`` (same scale as ``values``) are left bare."""
    if thumbnail.shape[:2] != values.shape:
        raise ValueError(f"thumbnail {thumbnail.shape[:2]} and score map {values.shape} differ in size")
    show = np.isfinite(values)
    if threshold is not None:
        show &= np.nan_to_num(values, nan=-np.inf) >= threshold
    span = vmax - vmin if vmax > vmin else 1.0
    idx = np.clip(np.round((np.nan_to_num(values, nan=vmin) - vmin) / span * 255), 0, 255).astype(np.int64)
    colour = lut[idx]
    out = thumbnail.copy()
    a = float(np.clip(alpha, 0.0, 1.0))
    out[show] = np.round(thumbnail[show] * (1 - a) + colour[show] * a).astype(np.uint8)
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def colorbar(width: int, lut: np.ndarray, vmin: float, vmax: float, label: str) -> np.ndarray:
    """A white (COLORBAR_HEIGHT, width, 3) strip: the colour ramp from ``vmin`` (left) to ``vmax`` (right)
    with the two values and ``label`` written under it."""
    strip = np.full((COLORBAR_HEIGHT, width, 3), 255, np.uint8)
    margin = min(60, max(4, width // 8))
    ramp_w = max(2, width - 2 * margin)
    ramp = lut[np.round(np.linspace(0, 255, ramp_w)).astype(np.int64)]
    strip[4:20, margin:margin + ramp_w] = ramp[None]
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    cv2.putText(strip, _fmt(vmin), (max(0, margin - 2), 36), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    hi = _fmt(vmax)
    (tw, _), _ = cv2.getTextSize(hi, font, scale, 1)
    cv2.putText(strip, hi, (max(0, margin + ramp_w - tw), 36), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    (lw, _), _ = cv2.getTextSize(label, font, scale, 1)
    cv2.putText(strip, label, (max(0, (width - lw) // 2), 36), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def render_heatmap(thumbnail: np.ndarray, values: np.ndarray, cmap: str, vmin: float, vmax: float, alpha: float,
                   threshold: float | None, label: str) -> np.ndarray:
    """The blended picture with its colour bar underneath: (h + COLORBAR_HEIGHT, w, 3) uint8."""
    lut = colormap_lut(cmap)
    picture = blend(thumbnail, values, lut, vmin, vmax, alpha, threshold)
    return np.concatenate([picture, colorbar(picture.shape[1], lut, vmin, vmax, label)], axis=0)


# -- top-k ----------------------------------------------------------------------------------------
def top_indices(scores: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
    """Indices of the ``k`` highest (``largest``) or lowest finite scores, best first, ties by index."""
    s = np.asarray(scores, np.float64).reshape(-1)
    idx = np.flatnonzero(np.isfinite(s))
    key = -s[idx] if largest else s[idx]
    return idx[np.lexsort((idx, key))][: max(0, int(k))]


def topk_feature_collection(coords: np.ndarray, scores: np.ndarray, size0: float, k: int, slide_id: str,
                            score_name: str, geometry: Literal["box", "point", "both"] = "box") -> dict:
    """The ``k`` highest-scoring patches as QuPath annotations in level-0 px: their footprint boxes and/or
    centre points, named ``top <rank>``, with the score, rank and patch index as measurements."""
    from preprocessing.geojson import annotation, polygon_geometry, stable_id

    c = np.asarray(coords, np.float64).reshape(-1, 2)
    features = []
    for rank, i in enumerate(top_indices(scores, k), start=1):
        x, y = c[i]
        value = float(np.asarray(scores, np.float64).reshape(-1)[i])
        extra = {"name": f"top {rank}: {score_name} {value:.4g}",
                 "measurements": {score_name: value, "rank": rank, "patch_index": int(i)}}
        kinds = ("box", "point") if geometry == "both" else (geometry,)
        for kind in kinds:
            if kind == "box":
                ring = np.array([[x, y], [x + size0, y], [x + size0, y + size0], [x, y + size0]])
                geom = polygon_geometry([ring])
            else:
                geom = {"type": "Point", "coordinates": [round(x + size0 / 2, 2), round(y + size0 / 2, 2)]}
            features.append(annotation(geom, stable_id("sgcl-topk", slide_id, score_name, rank, kind),
                                       f"top-{k} {score_name}", TOP_COLOUR, extra))
    return {"type": "FeatureCollection", "features": features}


# -- gallery --------------------------------------------------------------------------------------
def gallery_shape(n: int, tile: int, rows: int = 2) -> tuple[int, int]:
    """(height, width) of :func:`render_gallery` with ``n`` patches per row."""
    return rows * (tile + COLORBAR_HEIGHT // 2), max(1, n) * tile


def render_gallery(top: Sequence[np.ndarray], top_scores: Sequence[float], bottom: Sequence[np.ndarray],
                   bottom_scores: Sequence[float], tile: int = 128) -> np.ndarray:
    """Two rows: the top patches (best first, red captions) and the bottom patches (lowest first, blue),
    each resized to ``tile`` px with its rank and score under it."""
    n = max(len(top), len(bottom), 1)
    cap = COLORBAR_HEIGHT // 2
    h, w = gallery_shape(n, tile)
    out = np.full((h, w, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for row, (imgs, vals, name, colour) in enumerate(((top, top_scores, "top", TOP_COLOUR),
                                                      (bottom, bottom_scores, "bottom", BOTTOM_COLOUR))):
        y = row * (tile + cap)
        for j, (img, v) in enumerate(zip(imgs, vals)):
            patch = cv2.resize(np.ascontiguousarray(img[..., :3]), (tile, tile),
                               interpolation=cv2.INTER_AREA if img.shape[0] >= tile else cv2.INTER_CUBIC)
            out[y:y + tile, j * tile:(j + 1) * tile] = patch
            cv2.putText(out, f"{name} {j + 1}: {_fmt(float(v))}", (j * tile + 3, y + tile + cap - 6), font,
                        min(0.4, tile / 320), colour, 1, cv2.LINE_AA)
    return out
