"""Scale-aware small-window crops: window sizes, placement, overlap guarantee, tissue rejection."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from sgcl.transforms.base import CropBox, ViewGeometry
from sgcl.transforms.geometry import render_view
from sgcl.transforms.scale_aware import RHO_CHOICES, SmallWindowCrop, overlap_fraction, window_score


def _inside(b: CropBox, h: int, w: int) -> bool:
    return b.x0 >= 0 and b.y0 >= 0 and b.x0 + b.w <= w and b.y0 + b.h <= h


@pytest.mark.parametrize("rho", RHO_CHOICES)
def test_window_side_and_output_size(rho):
    rng = np.random.default_rng(0)
    native = SmallWindowCrop(rho=rho, size=224, resolution="native")
    zoom = SmallWindowCrop(rho=rho, size=224, resolution="zoom")
    assert native.out_size is None and zoom.out_size == 224
    for _ in range(100):
        b = native.sample(256, 256, rng)
        assert b.w == b.h == round(rho * 224) and _inside(b, 256, 256)
    jit = SmallWindowCrop(rho=rho, size=224, size_jitter=0.1, resolution="zoom")
    sides = np.array([jit.sample(256, 256, rng).w for _ in range(300)])
    s = rho * 224
    assert sides.min() >= np.floor(0.9 * s) and sides.max() <= np.ceil(1.1 * s)
    assert len(np.unique(sides)) > 1
    # a window larger than the patch is clamped to the patch
    assert SmallWindowCrop(rho=1.0, size=224).sample(100, 120, rng).w == 100


def test_random_placement_covers_patch_uniformly():
    rng = np.random.default_rng(1)
    crop = SmallWindowCrop(rho=0.25, size=224)
    x0 = np.array([crop.sample(256, 256, rng).x0 for _ in range(2000)])
    assert x0.min() == 0 and x0.max() == 256 - 56
    assert abs(x0.mean() - 100) < 5  # uniform over [0, 200]


@pytest.mark.parametrize("rho", [0.5, 0.25, 0.125])
def test_proximity_guarantees_quarter_overlap_random_does_not(rho):
    rng = np.random.default_rng(2)
    near = SmallWindowCrop(rho=rho, size=224, placement="proximity", kappa=0.5)
    far = SmallWindowCrop(rho=rho, size=224, placement="random")
    ov_near, ov_far = [], []
    for _ in range(1000):
        a, b = near.sample_pair(256, 256, rng)
        assert _inside(a, 256, 256) and _inside(b, 256, 256)
        s = a.w
        assert abs((b.x0 + b.w / 2) - (a.x0 + a.w / 2)) <= 0.5 * s  # |δ| <= κs, clamping only shrinks it
        ov_near.append(overlap_fraction(a, b))
        ov_far.append(overlap_fraction(*far.sample_pair(256, 256, rng)))
    assert min(ov_near) >= 0.25
    assert min(ov_near) < 0.3 and max(ov_near) > 0.9  # the whole range up to the bound is used
    assert np.mean(np.array(ov_far) < 0.25) > 0.3  # random placement gives unrelated views
    # with size jitter the bound holds for the smaller window; also at the patch border (clamping)
    jit = SmallWindowCrop(rho=rho, size=224, placement="proximity", size_jitter=0.1, resolution="zoom")
    assert min(overlap_fraction(*jit.sample_pair(64, 300, rng)) for _ in range(500)) >= 0.25


def _half_tissue(h: int = 256, w: int = 256) -> np.ndarray:
    rng = np.random.default_rng(3)
    img = np.full((h, w, 3), 242, np.uint8)  # glass
    img[:, : w // 2] = rng.integers(60, 200, (h, w // 2, 3), dtype=np.uint8)  # textured tissue on the left
    return img


def test_rejects_windows_empty_of_tissue():
    img = _half_tissue()
    rng = np.random.default_rng(4)
    plain = SmallWindowCrop(rho=0.125, size=224)
    strict = SmallWindowCrop(rho=0.125, size=224, min_tissue=0.5, min_std=10.0, max_tries=20)
    plain_ok = [window_score(img, plain.sample(256, 256, rng)).tissue >= 0.5 for _ in range(400)]
    strict_boxes = [strict.sample(256, 256, rng, image=img) for _ in range(400)]
    assert 0.35 < np.mean(plain_ok) < 0.65
    assert all(window_score(img, b).tissue >= 0.5 and window_score(img, b).std >= 10 for b in strict_boxes)
    pair_near = SmallWindowCrop(rho=0.125, size=224, placement="proximity", min_tissue=0.5, max_tries=20)
    for _ in range(200):
        a, b = pair_near.sample_pair(256, 256, rng, image=img)
        assert window_score(img, a).tissue >= 0.5 and window_score(img, b).tissue >= 0.5
        assert overlap_fraction(a, b) >= 0.25


def test_rejection_is_bounded_on_blank_patch():
    blank = np.full((128, 128, 3), 250, np.uint8)
    blank[:8, :8] = 100  # a speck of tissue in one corner
    crop = SmallWindowCrop(rho=0.25, size=128, min_tissue=0.9, max_tries=5)
    rng = np.random.default_rng(5)
    boxes = [crop.sample(128, 128, rng, image=blank) for _ in range(50)]
    assert all(_inside(b, 128, 128) for b in boxes)  # returns the best of max_tries, never loops forever
    with pytest.raises(ValueError, match="does not match"):
        crop.sample(64, 64, rng, image=blank)


def test_bad_parameters_are_clear_errors():
    for kw, msg in [({"rho": 0}, "rho"), ({"rho": 2}, "rho"), ({"placement": "near"}, "placement"),
                    ({"resolution": "big"}, "resolution"), ({"kappa": 1.5}, "kappa"), ({"size": 0}, "size"),
                    ({"size_jitter": 0.1, "resolution": "native"}, "cannot be batched")]:
        with pytest.raises(ValueError, match=msg):
            SmallWindowCrop(**kw)


def test_native_and_zoom_views_of_real_tile():
    tile = np.array(Image.open(shared_path("patches", "nct-crc-he-samples", "NORM-AAAWMSFI.tif")).convert("RGB"))
    rng = np.random.default_rng(6)
    for resolution in ("native", "zoom"):
        crop = SmallWindowCrop(rho=0.25, size=224, resolution=resolution, placement="proximity", min_std=5.0)
        a, b = crop.sample_pair(*tile.shape[:2], rng, image=tile)
        out = crop.out_size or int(a.w)
        view = render_view(tile, ViewGeometry(a.x0, a.y0, a.w, a.h, out, out))
        assert view.shape == (out, out, 3)
        if resolution == "native":
            np.testing.assert_array_equal(view, tile[int(a.y0) : int(a.y0 + a.h), int(a.x0) : int(a.x0 + a.w)])
