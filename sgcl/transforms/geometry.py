"""Pixel correspondence between two views of one patch, from their ``ViewGeometry`` rows.

Conventions (``sgcl.transforms.base``): a view is ``crop(x0, y0, w, h)`` -> resize to
``out_w × out_h`` -> optional horizontal flip -> ``rot_k`` × 90° counter-clockwise (``np.rot90``).
Coordinates are continuous, pixel *centres* at ``i + 0.5`` (the ``align_corners=False`` /
OpenCV convention), ``x`` along columns, ``y`` along rows. A row is
``[x0, y0, w, h, out_w, out_h, hflip, rot_k]`` (a (B, 8) tensor for a batch).

The rotated view has size ``out_w × out_h`` when ``rot_k`` is even and ``out_h × out_w`` when odd.
One counter-clockwise rotation of an image of width ``W`` maps ``(x, y) -> (y, W − x)``.
"""

from __future__ import annotations

import numpy as np
import torch


def _cols(geom: torch.Tensor):
    g = geom.to(torch.float64)
    x0, y0, w, h, ow, oh, flip, rot = g.unbind(-1)
    return x0, y0, w, h, ow, oh, flip > 0.5, torch.remainder(torch.round(rot), 4).long()


def view_size(geom: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(width, height) of each final (rotated) view, shape (B,)."""
    _, _, _, _, ow, oh, _, rot = _cols(geom)
    odd = (rot % 2) == 1
    return torch.where(odd, oh, ow), torch.where(odd, ow, oh)


def view_to_source(points: torch.Tensor, geom: torch.Tensor) -> torch.Tensor:
    """Map (B, N, 2) xy points in final-view coordinates to source-patch coordinates."""
    x0, y0, w, h, ow, oh, flip, rot = _cols(geom)
    x, y = points[..., 0].to(torch.float64), points[..., 1].to(torch.float64)
    # undo rotation steps k, k-1, .., 1; step j rotated an image of width ow (j odd) or oh (j even)
    for j in (3, 2, 1):
        m = (rot >= j)[:, None]
        width_in = (ow if j % 2 == 1 else oh)[:, None]
        x, y = torch.where(m, width_in - y, x), torch.where(m, x, y)
    x = torch.where(flip[:, None], ow[:, None] - x, x)
    xs = x0[:, None] + x * (w / ow)[:, None]
    ys = y0[:, None] + y * (h / oh)[:, None]
    return torch.stack([xs, ys], -1)


def source_to_view(points: torch.Tensor, geom: torch.Tensor) -> torch.Tensor:
    """Map (B, N, 2) xy source-patch points into final-view coordinates (may fall outside)."""
    x0, y0, w, h, ow, oh, flip, rot = _cols(geom)
    x = (points[..., 0].to(torch.float64) - x0[:, None]) * (ow / w)[:, None]
    y = (points[..., 1].to(torch.float64) - y0[:, None]) * (oh / h)[:, None]
    x = torch.where(flip[:, None], ow[:, None] - x, x)
    for j in (1, 2, 3):
        m = (rot >= j)[:, None]
        width_in = (ow if j % 2 == 1 else oh)[:, None]
        x, y = torch.where(m, y, x), torch.where(m, width_in - x, y)
    return torch.stack([x, y], -1)


def cell_centres(geom: torch.Tensor, feat_hw: tuple[int, int]) -> torch.Tensor:
    """(B, h·w, 2) view-coordinate centres of the cells of an ``h × w`` feature map (row-major)."""
    fh, fw = feat_hw
    vw, vh = view_size(geom)
    rows, cols = torch.meshgrid(torch.arange(fh, dtype=torch.float64), torch.arange(fw, dtype=torch.float64), indexing="ij")
    cx = (cols.reshape(-1) + 0.5)[None] * (vw / fw)[:, None]
    cy = (rows.reshape(-1) + 0.5)[None] * (vh / fh)[:, None]
    return torch.stack([cx, cy], -1)


def correspondence(
    geom_a: torch.Tensor, geom_b: torch.Tensor, feat_hw_a: tuple[int, int], feat_hw_b: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every cell of view A's feature map, the cell of view B that sees the same source point.

    Returns ``idx_a`` (B, ha·wa) flat cell indices of A (row-major), ``idx_b`` (B, ha·wa) the
    flat index of the B cell containing the mapped A cell centre (0 where invalid), and
    ``valid`` (B, ha·wa) bool: the point lies inside view B.
    """
    if geom_a.ndim == 1:
        geom_a, geom_b = geom_a[None], geom_b[None]
    geom_a, geom_b = geom_a.detach().cpu(), geom_b.detach().cpu()
    fhb, fwb = feat_hw_b
    src = view_to_source(cell_centres(geom_a, feat_hw_a), geom_a)
    pb = source_to_view(src, geom_b)
    vw, vh = view_size(geom_b)
    col = torch.floor(pb[..., 0] * (fwb / vw)[:, None])
    row = torch.floor(pb[..., 1] * (fhb / vh)[:, None])
    valid = (col >= 0) & (col < fwb) & (row >= 0) & (row < fhb)
    idx_b = torch.where(valid, row * fwb + col, torch.zeros_like(col)).long()
    n = feat_hw_a[0] * feat_hw_a[1]
    idx_a = torch.arange(n).expand(geom_a.shape[0], n).clone()
    return idx_a, idx_b, valid


def render_view(image: np.ndarray, geom) -> np.ndarray:
    """Make the view that ``geom`` describes from an (H, W[, C]) array (reference implementation:
    integer crop box, bilinear resize with the pixel-centre convention, flip, ``np.rot90``)."""
    import cv2

    from sgcl.transforms.base import ViewGeometry

    g = geom if isinstance(geom, ViewGeometry) else ViewGeometry.from_array(geom)
    x0, y0, w, h = int(round(g.x0)), int(round(g.y0)), int(round(g.w)), int(round(g.h))
    crop = image[y0 : y0 + h, x0 : x0 + w]
    if (g.out_w, g.out_h) != (w, h):
        crop = cv2.resize(crop, (g.out_w, g.out_h), interpolation=cv2.INTER_LINEAR)
    if g.hflip:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(np.rot90(crop, g.rot_k))
