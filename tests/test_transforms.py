"""Views, their geometry, the quadrant multi-crop and the photometric augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgcl.transforms.base import CropBox, ViewGeometry
from sgcl.transforms.crops import RandomResizedCropPolicy, build_crop_policy
from sgcl.transforms.gpu import GPUPhotometric
from sgcl.transforms.multicrop import QuadrantMultiCrop, quadrant_boxes
from sgcl.transforms.photometric import PhotometricAugment, PhotometricParams, hed_jitter
from sgcl.transforms.views import ViewBuilder, make_view, view_to_source

from conftest import shared_path


def coordinate_pattern(h: int, w: int) -> np.ndarray:
    """float32 image whose channel 0 is the pixel's x and channel 1 its y."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([xx, yy, np.zeros_like(xx)], -1)


def assert_geometry_matches(view: np.ndarray, geom: ViewGeometry, tol: float = 1e-3) -> None:
    vv, uu = np.mgrid[0:view.shape[0], 0:view.shape[1]]
    sx, sy = view_to_source(geom, uu, vv)
    # bilinear interpolation of a linear ramp is exact wherever it does not touch the crop's edge
    inner = (sx >= geom.x0) & (sx <= geom.x0 + geom.w - 1) & (sy >= geom.y0) & (sy <= geom.y0 + geom.h - 1)
    assert inner.mean() > 0.8
    assert np.abs(sx - view[..., 0])[inner].max() < tol
    assert np.abs(sy - view[..., 1])[inner].max() < tol


@pytest.mark.parametrize("box,out", [(CropBox(5, 7, 40, 30), 32), (CropBox(5, 7, 40, 30), 80), (CropBox(10, 3, 33, 33), None),
                                     (CropBox(2.5, 3.25, 30.5, 20.0), 48)])
def test_view_geometry_maps_every_pixel_back_to_the_source(box, out):
    img = coordinate_pattern(64, 64)
    for hflip in (False, True):
        for k in range(4):
            view, geom = make_view(img, box, out, hflip, k)
            assert geom.rot_k == k and geom.hflip == hflip
            assert ViewGeometry.from_array(geom.to_array()) == geom
            assert_geometry_matches(view, geom)


def test_view_builder_with_random_policy_records_the_crop():
    img = coordinate_pattern(96, 96)
    builder = ViewBuilder(RandomResizedCropPolicy(40, scale=(0.2, 1.0)), photometric=None)
    rng = np.random.default_rng(3)
    seen_rot, seen_flip = set(), set()
    for view, geom in builder.views(img, rng, 12):
        assert view.shape == (40, 40, 3)
        assert 0 <= geom.x0 and geom.x0 + geom.w <= 96 and 0 <= geom.y0 and geom.y0 + geom.h <= 96
        assert_geometry_matches(view, geom, tol=0.1)  # area-averaged downscaling: < 0.1 px off
        seen_rot.add(geom.rot_k)
        seen_flip.add(geom.hflip)
    assert seen_rot == {0, 1, 2, 3} and seen_flip == {False, True}


def test_random_resized_crop_respects_scale_and_is_seeded():
    policy = RandomResizedCropPolicy(96, scale=(0.2, 0.56))
    boxes = [policy.sample(128, 128, np.random.default_rng(i)) for i in range(200)]
    areas = np.array([b.w * b.h for b in boxes]) / 128**2
    assert areas.min() >= 0.18 and areas.max() <= 0.58
    assert all(float(b.x0).is_integer() and b.x0 + b.w <= 128 and b.y0 + b.h <= 128 for b in boxes)
    assert policy.sample(128, 128, np.random.default_rng(7)) == policy.sample(128, 128, np.random.default_rng(7))
    with pytest.raises(ValueError, match="unknown crop policy"):
        build_crop_policy("nope", 96)


def test_quadrants_are_the_four_corners():
    h = w = 64
    img = np.zeros((h, w, 3), np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    for c, q in zip(colours, quadrant_boxes(h, w)):
        img[int(q.y0):int(q.y0 + q.h), int(q.x0):int(q.x0 + q.w)] = c
    assert [(b.x0, b.y0) for b in quadrant_boxes(h, w)] == [(0, 0), (32, 0), (0, 32), (32, 32)]
    crop = QuadrantMultiCrop(ViewBuilder(RandomResizedCropPolicy(24, scale=(0.2, 0.56)), photometric=None))
    for seed in range(5):
        views = crop(img, np.random.default_rng(seed))
        assert len(views) == 4
        for (view, geom), colour, q in zip(views, colours, quadrant_boxes(h, w)):
            assert view.shape == (24, 24, 3)
            assert (view.reshape(-1, 3) == colour).all(), "a local crop left its quadrant"
            assert q.x0 <= geom.x0 and geom.x0 + geom.w <= q.x0 + q.w and q.y0 <= geom.y0 and geom.y0 + geom.h <= q.y0 + q.h
    # geometry of the local crops is in patch coordinates
    pattern = coordinate_pattern(64, 64)
    for view, geom in crop(pattern, np.random.default_rng(11)):
        assert_geometry_matches(view, geom, tol=0.1)


def real_he_patch() -> np.ndarray:
    import cv2

    folder = shared_path("patches", "nct-crc-he-samples")
    path = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".tif", ".png", ".jpg"))[0]
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def test_photometric_is_seeded_and_changes_colour_on_real_he():
    img = real_he_patch()
    aug = PhotometricAugment(PhotometricParams(hed_sigma=0.05))
    a = aug(img, np.random.default_rng(1))
    b = aug(img, np.random.default_rng(1))
    c = aug(img, np.random.default_rng(2))
    assert a.dtype == np.uint8 and a.shape == img.shape
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    grey = PhotometricAugment(PhotometricParams(p_jitter=0, p_grey=1.0, p_blur=0))(img, np.random.default_rng(0))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_hed_jitter_identity_and_haematoxylin_shift():
    img = real_he_patch().astype(np.float32)
    same = hed_jitter(img, np.ones(3), np.zeros(3))
    assert np.abs(same - np.maximum(img, 1.0)).max() < 0.05
    darker_h = hed_jitter(img, np.array([1.5, 1.0, 1.0]), np.zeros(3))
    # more haematoxylin absorbs more red and green light than blue: the image gets darker and bluer
    assert darker_h.mean() < img.mean()
    assert (darker_h[..., 2] - darker_h[..., 0]).mean() > (img[..., 2] - img[..., 0]).mean()


def test_gpu_photometric_on_cpu_tensors():
    img = torch.from_numpy(real_he_patch()).permute(2, 0, 1)[None].repeat(8, 1, 1, 1).contiguous()
    off = GPUPhotometric(PhotometricParams(p_jitter=0, p_grey=0, p_blur=0))
    plain = off(img, torch.Generator().manual_seed(0))
    expected = (img.float() / 255 - off.mean) / off.std
    assert torch.allclose(plain, expected, atol=1e-5)
    on = GPUPhotometric(PhotometricParams(p_jitter=1.0, p_grey=0.0, p_blur=1.0))
    out1 = on(img, torch.Generator().manual_seed(5))
    out2 = on(img, torch.Generator().manual_seed(5))
    assert out1.shape == img.shape and out1.dtype == torch.float32
    assert torch.equal(out1, out2)
    assert not torch.allclose(out1[0], out1[1]), "each sample must get its own jitter"
    grey = GPUPhotometric(PhotometricParams(p_jitter=0, p_grey=1.0, p_blur=0))(img, torch.Generator().manual_seed(0))
    rgb = grey * off.std + off.mean
    assert torch.allclose(rgb[:, 0], rgb[:, 1], atol=1e-5) and torch.allclose(rgb[:, 1], rgb[:, 2], atol=1e-5)
    blurred = GPUPhotometric(PhotometricParams(p_jitter=0, p_grey=0, p_blur=1.0, blur_sigma=(2.0, 2.0)))(img)
    assert blurred.var() < plain.var()  # smoothing removes high-frequency energy


def test_gpu_hed_jitter_matches_the_cpu_one():
    img = real_he_patch()
    alpha, beta = np.array([1.3, 0.8, 1.0]), np.array([0.02, -0.03, 0.0])
    cpu = np.clip(hed_jitter(img, alpha, beta), 0, 255) / 255.0
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    gpu = GPUPhotometric._hed(x, torch.tensor([True]), torch.tensor(alpha, dtype=torch.float32)[None],
                              torch.tensor(beta, dtype=torch.float32)[None])
    assert np.abs(gpu[0].permute(1, 2, 0).numpy() - cpu).max() < 1e-3
    untouched = GPUPhotometric._hed(x, torch.tensor([False]), torch.ones(1, 3), torch.zeros(1, 3))
    assert torch.equal(untouched, x)
