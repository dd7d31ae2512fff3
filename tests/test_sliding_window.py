"""Sliding-window stitching: coverage, no seams (exact for translation-equivariant models), slide regions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.segmentation.sliding_window import (predict_slide_region, sliding_window_predict, window_starts,
                                                     window_weights)
from evaluation.segmentation.slide_source import SlideSourceError
from preprocessing.readers import open_slide
from tests.conftest import shared_path

torch.set_num_threads(1)


def _pointwise_model(seed: int = 0, k: int = 3) -> torch.nn.Module:
    """A translation-equivariant model: 1×1 conv → ReLU → 1×1 conv → softmax (no spatial context)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, k, 1), torch.nn.Softmax(1))
    return net.eval()


def _one_pass(model, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        return model(x)[0].numpy()


@pytest.mark.parametrize("length,window,stride", [(1, 8, 4), (8, 8, 4), (9, 8, 4), (100, 32, 16), (101, 32, 24), (257, 64, 1)])
def test_windows_cover_every_pixel(length, window, stride):
    starts = window_starts(length, window, stride)
    covered = np.zeros(max(length, window), bool)
    for s in starts:
        covered[s:s + window] = True
    assert covered[:length].all()
    assert starts[0] == 0 and starts[-1] == max(0, length - window)
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))  # no gap larger than the stride


def test_gaussian_weights_sigma_is_window_over_8():
    w = window_weights(64, "gaussian").numpy()
    assert w.shape == (64, 64) and w.min() > 0
    centre = (64 - 1) / 2
    profile = w[31] / w[31].max()
    # the value one σ (= 8 px) from the centre is exp(-1/2)
    xs = np.arange(64) - centre
    np.testing.assert_allclose(profile, np.exp(-0.5 * (xs / 8) ** 2) / np.exp(-0.5 * (xs / 8) ** 2).max(), rtol=1e-5)
    assert np.array_equal(window_weights(16, "uniform").numpy(), np.ones((16, 16), np.float32))


@pytest.mark.parametrize("weighting", ["gaussian", "uniform"])
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
def test_stitched_equals_one_pass_for_equivariant_model(weighting, overlap):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (203, 317, 3), dtype=np.uint8)  # not a multiple of the window
    model = _pointwise_model()
    stitched = sliding_window_predict(model, image, 64, overlap=overlap, weighting=weighting, batch_size=5)
    assert stitched.shape == (3, 203, 317)
    np.testing.assert_allclose(stitched, _one_pass(model, image), atol=1e-5)


def test_image_smaller_than_window_and_non_square_window():
    rng = np.random.default_rng(2)
    model = _pointwise_model(k=2)
    small = rng.integers(0, 256, (20, 37, 3), dtype=np.uint8)
    np.testing.assert_allclose(sliding_window_predict(model, small, 64), _one_pass(model, small), atol=1e-5)
    image = rng.integers(0, 256, (150, 90, 3), dtype=np.uint8)
    out = sliding_window_predict(model, image, (48, 32), overlap=0.5)
    np.testing.assert_allclose(out, _one_pass(model, image), atol=1e-5)


def test_overlap_and_gaussian_weighting_reduce_seams_of_a_context_model():
    """A 7×7 conv sees zero padding at window borders; 50 % overlap + Gaussian weights must hide it."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 2, 7, padding=3).eval()
    rng = np.random.default_rng(3)
    image = (rng.random((192, 192, 3)) * 255).astype(np.uint8)
    inner = (slice(None), slice(8, -8), slice(8, -8))  # the image border differs by design (reflect vs zero pad)
    reference = _one_pass(conv, image)[inner]
    err_plain = np.abs(sliding_window_predict(conv, image, 64, overlap=0.0, weighting="uniform")[inner] - reference)
    err_gauss = np.abs(sliding_window_predict(conv, image, 64, overlap=0.5, weighting="gaussian")[inner] - reference)
    assert err_plain.max() > 0.05  # the seams are real without overlap
    assert err_gauss.max() < 0.2 * err_plain.max()


def test_bad_arguments_are_clear_errors():
    model = _pointwise_model()
    image = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_predict(model, image, 16, overlap=1.0)
    with pytest.raises(ValueError, match="weighting"):
        sliding_window_predict(model, image, 16, weighting="triangle")
    with pytest.raises(ValueError, match="model_fn returned shape"):
        sliding_window_predict(lambda x: x[:, :, ::2], image, 16)
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        sliding_window_predict(model, np.zeros((2, 40, 40, 3), np.uint8), 16)


def _dark_pixels(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel (equivariant) 2-class 'model': class 1 where the red channel is below 0.7."""
    fg = (x[:, :1] < 0.7).float()
    return torch.cat([1 - fg, fg], 1)


def test_slide_region_at_native_resolution_is_exact(demo_slide):
    x0, y0, w, h = 300, 500, 700, 450
    many = predict_slide_region(_dark_pixels, demo_slide, x0, y0, w, h, mpp=0.499, window=64, tile_size=200, progress=False)
    one = predict_slide_region(_dark_pixels, demo_slide, x0, y0, w, h, mpp=0.499, window=64, tile_size=4096, progress=False)
    with open_slide(demo_slide) as reader:
        region = reader.read_region(x0, y0, 0, w, h)
    expected = (region[..., 0] < 0.7 * 255).astype(np.uint8)
    assert many.mask.shape == (h, w) and many.info["tiles"] == 12 and one.info["tiles"] == 1
    assert np.array_equal(many.mask, one.mask)
    assert np.array_equal(many.mask, expected)
    assert np.array_equal(many.image, region)


def test_slide_region_tiling_leaves_no_seams_for_a_context_model(demo_slide):
    """A 7×7-conv model sees across window borders; the tiled region must equal the untiled one."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 7, padding=3), torch.nn.Softmax(1)).eval()
    args = dict(x0=250, y0=400, w=530, h=390, mpp=0.499, window=64, overlap=0.5, progress=False, return_probs=True)
    with torch.no_grad():
        tiled = predict_slide_region(net, demo_slide, tile_size=96, **args)
        whole = predict_slide_region(net, demo_slide, tile_size=4096, **args)
    assert tiled.info["tiles"] == 30 and whole.info["tiles"] == 1
    assert tiled.probs.shape == (3, 390, 530)
    np.testing.assert_allclose(tiled.probs, whole.probs, atol=1e-5)
    assert (tiled.mask == whole.mask).mean() > 0.9999
    # and the region interior equals in-memory stitching of the same pixels (windows on the same grid:
    # one stride of real context, so the in-memory grid starts one stride before the region's)
    with open_slide(demo_slide) as reader:
        context = reader.read_region(250 - 32, 400 - 32, 0, 530 + 64, 390 + 64)
    with torch.no_grad():
        mem = sliding_window_predict(net, context, 64, overlap=0.5)[:, 32:-32, 32:-32]
    inner = (slice(None), slice(64, -64), slice(64, -64))
    np.testing.assert_allclose(whole.probs[inner], mem[inner], atol=1e-4)


def test_slide_region_at_coarser_mpp_has_the_right_shape_and_scale(demo_slide):
    pred = predict_slide_region(_dark_pixels, demo_slide, 0, 0, 2220, 2967, mpp=2.0, window=128, tile_size=256, progress=False)
    scale = 2.0 / 0.499
    assert pred.mask.shape == (round(2967 / scale), round(2220 / scale))
    assert pred.image.shape == pred.mask.shape + (3,)
    assert pred.scale == pytest.approx(scale) and pred.info["slide_mpp"] == pytest.approx(0.499)
    # the tissue of the demo slide is dark: a real foreground share, not all or nothing
    assert 0.05 < pred.mask.mean() < 0.95
    with open_slide(demo_slide) as reader:
        thumb = reader.read_scaled(scale)
    agree = (pred.mask == (thumb[..., 0] < 0.7 * 255)).mean()
    assert agree > 0.97


def test_slide_without_mpp_needs_slide_mpp():
    slide = shared_path("wsi", "tcga-cr-7395-01a-01-ts1.svs")
    with pytest.raises(SlideSourceError, match="--slide-mpp"):
        predict_slide_region(_dark_pixels, slide, 0, 0, 512, 512, mpp=1.0, progress=False)
    pred = predict_slide_region(_dark_pixels, slide, 0, 0, 2048, 1024, mpp=2.0, slide_mpp=0.5, window=64, progress=False)
    assert pred.mask.shape == (256, 512) and pred.level == 1  # level 1 (downsample ~2) is read, then halved
