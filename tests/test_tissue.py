"""Tissue detection, pen-ink filter, integral-image tissue fractions and the background check."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from _tile_fixtures import synthetic_he, tissue_truth
from conftest import shared_path
from preprocessing.config import TissueConfig
from preprocessing.grid import cell_bounds, make_grid, plan_geometry, tissue_fractions
from preprocessing.readers import open_slide
from preprocessing.tissue import background_fraction, detect_tissue, pen_ink_mask


def iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def test_detects_synthetic_tissue():
    img = synthetic_he(300, 400)
    tm = detect_tissue(img, 8.0, TissueConfig())
    assert iou(tm.mask, tissue_truth(300, 400)) > 0.95
    assert tm.area_mm2 == pytest.approx(tm.mask.sum() * 64 / 1e6)


def test_blank_slide_has_no_tissue():
    img = np.full((200, 200, 3), 240, np.uint8) + np.random.default_rng(0).integers(0, 3, (200, 200, 3)).astype(np.uint8)
    assert not detect_tissue(img, 8.0, TissueConfig()).mask.any()


@pytest.mark.parametrize("colour", [(30, 60, 200), (40, 160, 60), (20, 20, 25)], ids=["blue", "green", "black"])
def test_pen_ink_removed(colour):
    img = synthetic_he(300, 400)
    cv2.line(img, (0, 100), (399, 140), colour, 5)   # crosses tissue and background
    line = np.zeros((300, 400), np.uint8)
    cv2.line(line, (0, 100), (399, 140), 1, 5)
    line = line.astype(bool)
    assert pen_ink_mask(img)[line].mean() > 0.9 and pen_ink_mask(img)[~line].mean() < 0.01
    with_filter = detect_tissue(img, 8.0, TissueConfig(pen_filter=True))
    without = detect_tissue(img, 8.0, TissueConfig(pen_filter=False))
    off_tissue_line = line & ~tissue_truth(300, 400)
    if colour != (20, 20, 25):  # black ink has no saturation: never tissue; coloured ink is, without the filter
        assert without.mask[off_tissue_line].mean() > 0.9
    assert not with_filter.mask[line].any()
    assert with_filter.pen_pixels > 0 or colour == (20, 20, 25)
    assert iou(with_filter.mask, tissue_truth(300, 400) & ~line) > 0.9


def test_small_components_removed_and_small_holes_filled():
    mask_img = np.full((400, 400, 3), 245, np.uint8)
    pink = (200, 90, 170)
    cv2.rectangle(mask_img, (50, 50), (250, 250), pink, -1)   # 0.16 mm² at 2 µm/px
    cv2.rectangle(mask_img, (140, 140), (145, 145), (245, 245, 245), -1)  # 36 px hole = 0.000144 mm²
    cv2.rectangle(mask_img, (320, 320), (323, 323), pink, -1)  # 16 px speck = 0.000064 mm²
    cfg = TissueConfig(min_area_mm2=0.001, min_hole_area_mm2=0.0005, close_um=0, median_blur=0)
    tm = detect_tissue(mask_img, 2.0, cfg)
    assert tm.mask[142, 142] and not tm.mask[321, 321] and tm.mask[100, 100] and not tm.mask[10, 10]
    keep_holes = detect_tissue(mask_img, 2.0, TissueConfig(min_area_mm2=0, min_hole_area_mm2=0, close_um=0, median_blur=0))
    assert not keep_holes.mask[142, 142] and keep_holes.mask[321, 321]


def test_fixed_threshold_method():
    img = synthetic_he(100, 100)
    assert detect_tissue(img, 8.0, TissueConfig(method="fixed", saturation_threshold=8)).threshold == 8


def test_integral_image_fractions_equal_brute_force():
    rng = np.random.default_rng(1)
    mask = cv2.resize((rng.random((40, 50)) > 0.5).astype(np.uint8), (500, 400), interpolation=cv2.INTER_NEAREST) > 0
    w0, h0 = 16000, 12800  # mask px per level-0 px = 1/32
    for mpp, target, ps, stride in [(0.25, 0.5, 224, None), (0.3, 0.5, 224, 150), (0.5, 0.5, 256, 512)]:
        geom = plan_geometry([1.0, 4.0], mpp, target, ps, stride)
        grid = make_grid(geom, [(w0, h0), (w0 // 4, h0 // 4)])
        scale = (500 / w0, 400 / h0)
        frac = tissue_fractions(mask, scale, grid, geom.patch_size_level0)
        assert frac.shape == (grid.n_rows, grid.n_cols) and grid.n_rows > 5
        xa, xb = cell_bounds(grid.x0, geom.patch_size_level0, scale[0], 500)
        ya, yb = cell_bounds(grid.y0, geom.patch_size_level0, scale[1], 400)
        brute = np.array([[mask[ya[j]:yb[j], xa[i]:xb[i]].mean() for i in range(grid.n_cols)] for j in range(grid.n_rows)])
        np.testing.assert_allclose(frac, brute, atol=1e-6)
        # the bounds are the cell's physical footprint on the mask (± half a mask pixel)
        np.testing.assert_allclose(xa, grid.x0 * scale[0], atol=0.5 + 1e-9)
        np.testing.assert_allclose(xb - xa, geom.patch_size_level0 * scale[0], atol=1.0 + 1e-9)


def test_background_fraction():
    p = np.full((3, 10, 10, 3), 128, np.uint8)
    p[0, :5] = 250                  # half white
    p[1, :2] = 5                    # 20 % black
    p[2, 0, 0] = (250, 250, 100)    # min(RGB) below the white threshold: not background
    np.testing.assert_allclose(background_fraction(p, 220, 25), [0.5, 0.2, 0.0])


def test_real_slide_tissue_area_is_sane():
    with open_slide(shared_path("wsi", "cmu-1-small-region.svs")) as r:
        low = r.read_scaled(16.0)
    tm = detect_tissue(low, 0.499 * 16, TissueConfig())
    frac = tm.mask.mean()
    assert 0.1 < frac < 0.5, frac  # a strip of tissue on a mostly empty field
