"""IGU-Aug: entropy maps against a direct computation on a real image, sampling map, categories, jitter."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from sgcl.sampling.info_guided import (
    AdaptiveJitter,
    InfoGuidedPixelSampler,
    categorize,
    crop_around,
    entropy_box_hist,
    entropy_map,
    entropy_rank_disk,
    haematoxylin_density,
    sampling_weights,
    thresholds_from_percentiles,
    to_grey,
)


@pytest.fixture(scope="module")
def he_crop() -> np.ndarray:
    path = shared_path("images", "he-tiatoolbox-stain-target.png")
    return np.array(Image.open(path).convert("RGB"))[300:396, 400:496]  # 96 x 96 real H&E


def _direct_entropy(grey: np.ndarray, y: int, x: int, offsets: list[tuple[int, int]], base: float) -> float:
    H, W = grey.shape
    vals = [grey[y + dy, x + dx] for dy, dx in offsets if 0 <= y + dy < H and 0 <= x + dx < W]
    counts = np.bincount(np.array(vals), minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(base))


def _probe_pixels(h: int, w: int, rng: np.random.Generator, n: int = 60) -> list[tuple[int, int]]:
    corners = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (3, w // 2), (h // 2, w - 2)]
    return corners + [(int(rng.integers(h)), int(rng.integers(w))) for _ in range(n)]


def test_rank_disk_entropy_matches_direct_loop_on_real_image(he_crop):
    grey = to_grey(he_crop, "haematoxylin")
    ent = entropy_rank_disk(grey, 10)
    assert ent.shape == grey.shape and ent.dtype == np.float32
    r = 10
    disk = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= r * r]
    for y, x in _probe_pixels(*grey.shape, np.random.default_rng(0)):
        assert ent[y, x] == pytest.approx(_direct_entropy(grey, y, x, disk, 2.0), abs=1e-4)
    assert 2.0 < float(ent.mean()) < 8.0  # bits of a textured 8-bit image


def test_box_hist_entropy_matches_direct_loop_on_real_image(he_crop):
    grey = to_grey(he_crop, "luminance")
    k = 64
    ent = entropy_box_hist(grey, k)
    box = [(dy, dx) for dy in range(-k // 2, k - k // 2) for dx in range(-k // 2, k - k // 2)]
    for y, x in _probe_pixels(*grey.shape, np.random.default_rng(1), n=25):
        assert ent[y, x] == pytest.approx(_direct_entropy(grey, y, x, box, np.e), abs=1e-4)
    small = entropy_box_hist(grey, 5)
    box5 = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    for y, x in _probe_pixels(*grey.shape, np.random.default_rng(2), n=25):
        assert small[y, x] == pytest.approx(_direct_entropy(grey, y, x, box5, np.e), abs=1e-5)


def test_greyscale_haematoxylin_and_luminance(he_crop):
    from skimage.color import rgb2hed

    np.testing.assert_allclose(haematoxylin_density(he_crop), np.maximum(rgb2hed(he_crop)[..., 0], 0), atol=1e-5)
    h = to_grey(he_crop, "haematoxylin")
    lum = to_grey(he_crop, "luminance")
    expect = np.rint(he_crop.astype(np.float64) @ [0.299, 0.587, 0.114])
    assert np.abs(lum.astype(int) - expect).max() <= 1
    # haematoxylin-rich (nuclear, dark) pixels are bright in the H map, glass is dark
    dark = lum < np.percentile(lum, 10)
    light = lum > np.percentile(lum, 90)
    assert h[dark].mean() > h[light].mean() + 40
    white = np.full((8, 8, 3), 250, np.uint8)
    assert to_grey(white, "haematoxylin").max() < 10
    with pytest.raises(ValueError, match="greyscale mode"):
        to_grey(he_crop, "hsv")


def test_sampling_map_power_threshold_and_blank_fallback():
    ent = np.array([[0.0, 1.0], [4.0, 8.0]], np.float32)
    w = sampling_weights(ent, alpha=0.5)
    np.testing.assert_allclose(w, np.sqrt(ent))
    np.testing.assert_array_equal(sampling_weights(ent, threshold=4.0), [[0, 0], [1, 1]])
    np.testing.assert_array_equal(sampling_weights(np.zeros((2, 2)), alpha=0.3), np.ones((2, 2)))
    s = InfoGuidedPixelSampler(alpha=0.5)
    p = s.probabilities(ent)
    assert p.sum() == pytest.approx(1.0) and p[1, 1] / p[1, 0] == pytest.approx(np.sqrt(2))


def test_sampler_frequencies_follow_h_alpha():
    ent = np.full((20, 20), 2.0, np.float32)
    ent[:, 10:] = 6.0
    s = InfoGuidedPixelSampler(alpha=1.0)
    a = s.sample(None, 20000, np.random.default_rng(0), entropy=ent)
    ratio = (a.xs >= 10).mean() / (a.xs < 10).mean()
    assert ratio == pytest.approx(3.0, rel=0.06)
    assert np.all(ent[a.ys, a.xs] == a.entropy)


def test_categories_thresholds_and_percentiles():
    h = np.array([1.0, 3.5, 3.6, 4.49, 4.5, 7.0])
    assert categorize(h).tolist() == [0, 0, 1, 1, 2, 2]
    assert categorize(h, (2.0, 5.0)).tolist() == [0, 1, 1, 1, 1, 2]
    vals = np.arange(101, dtype=np.float64)
    assert thresholds_from_percentiles(vals) == (30.0, 70.0)


def test_adaptive_jitter_ranges_per_category():
    jit = AdaptiveJitter()
    rng = np.random.default_rng(0)
    for cat, (blo, bhi), (clo, chi) in [(1, (0.505, 1.997), (0.340, 2.329)), (2, (0.562, 1.612), (0.416, 1.817))]:
        f = np.array([jit.factors(cat, rng) for _ in range(500)])
        assert blo <= f[:, 0].min() and f[:, 0].max() <= bhi and clo <= f[:, 1].min() and f[:, 1].max() <= chi
        assert f[:, 0].max() - f[:, 0].min() > 0.8 * (bhi - blo)
    assert jit.ranges["low"] == jit.ranges["high"]  # the reference code's else-branch
    img = np.full((4, 4, 3), 100, np.uint8)
    img[0, 0] = 200
    out = jit(img, 1, np.random.default_rng(3))
    assert out.dtype == np.uint8 and out.shape == img.shape and not np.array_equal(out, img)


def test_info_guided_anchors_prefer_informative_pixels_on_real_image(he_crop):
    s = InfoGuidedPixelSampler(method="rank_disk", grey="haematoxylin", alpha=3.0)
    ent = s.entropy(he_crop)
    a = s.sample(he_crop, 4000, np.random.default_rng(0))
    assert a.entropy.mean() > ent.mean()
    assert set(np.unique(a.category)) <= {0, 1, 2}
    b = entropy_map(he_crop, "box_hist", "luminance", box=16)
    assert b.shape == he_crop.shape[:2] and float(b.max()) <= np.log(256) + 1e-6


def test_crop_around_contains_anchor():
    rng = np.random.default_rng(0)
    for _ in range(200):
        y, x = int(rng.integers(50)), int(rng.integers(80))
        y0, x0 = crop_around(50, 80, y, x, 16, rng)
        assert 0 <= y0 <= y < y0 + 16 <= 50 and 0 <= x0 <= x < x0 + 16 <= 80
