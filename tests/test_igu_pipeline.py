"""IGU-Aug in the data pipeline: entropy once per patch on its own pixels, rendered through each
global view's geometry, bounded cache, per-region adaptive jitter, config switches and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_path
from preprocessing.h5format import write_patch_file
from sgcl.config import ConfigError, load_config
from sgcl.data.dataset import PatchDataset, collate
from sgcl.methods.dense import DenseConfig, DenseMethod
from sgcl.methods.base import PretrainMethod
from sgcl.sampling.info_guided import DEFAULT_JITTER_RANGES, HE_CATEGORY_THRESHOLDS, AdaptiveJitter, InfoGuide, PatchEntropy, entropy_map
from sgcl.train.config import PretrainConfig
from sgcl.train.trainer import build_sample_transform
from sgcl.transforms.geometry import render_view
from sgcl.transforms.photometric import PhotometricAugment, PhotometricParams


@pytest.fixture(scope="module")
def he_patches() -> list[np.ndarray]:
    """Four real 224-px H&E tiles (tumour, lymphocytes, stroma, adipose)."""
    root = shared_path("patches", "crc-val-he-7k-sample")
    return [np.array(Image.open(sorted((root / c).glob("*.jpg"))[0]).convert("RGB")) for c in ("TUM", "LYM", "STR", "ADI")]


def _aug(*overrides: str):
    return load_config(PretrainConfig, None, ["aug.global_size=64", *overrides]).aug


def _dense(**kw) -> DenseConfig:
    return DenseConfig(enabled=True, sampler="igu", **kw)


def test_entropy_is_computed_on_the_unaugmented_patch_and_follows_each_view_geometry(he_patches):
    transform = build_sample_transform(_aug("aug.hue=0.3"), 3, False, _dense())
    rng = np.random.default_rng(0)
    for img in he_patches[:2]:
        patch_map = entropy_map(img).astype(np.float16).astype(np.float32)  # the cache's precision
        for _ in range(3):
            out = transform(img, rng)
            assert len(out["entropy"]) == len(out["views"]) == 3
            for view, geom, ent in zip(out["views"], out["geoms"], out["entropy"]):
                assert ent.dtype == torch.float32 and tuple(ent.shape) == tuple(view.shape[-2:])
                np.testing.assert_array_equal(ent.numpy(), render_view(patch_map, geom.numpy()))
            rotated = [int(g[7]) for g in out["geoms"]]
        assert any(rotated)  # rotations and flips are exercised
    # not the entropy of the jittered view: recomputing on the view gives another map
    jittered = (out["views"][0].permute(1, 2, 0).numpy() * np.array([0.229, 0.224, 0.225]) + np.array([0.485, 0.456, 0.406]))
    again = entropy_map(np.clip(jittered * 255 + 0.5, 0, 255).astype(np.uint8))
    assert np.abs(again - out["entropy"][0].numpy()).mean() > 0.1


def test_entropy_cache_is_bounded_and_keyed_by_the_patch_pixels(he_patches, monkeypatch):
    import sgcl.sampling.info_guided as ig

    calls = []
    monkeypatch.setattr(ig, "entropy_map", lambda img, *a: calls.append(1) or np.full(img.shape[:2], float(img.mean()), np.float32))
    cache = PatchEntropy(cache_size=2)
    first = cache(he_patches[0])
    np.testing.assert_array_equal(cache(he_patches[0].copy()), first)
    assert len(calls) == 1  # same pixels: a hit
    for img in he_patches:
        cache(img)
    assert len(cache.cache) == 2 and len(calls) == 4  # LRU of 2 maps, whatever the number of patches
    assert all(v.dtype == np.float16 for v in cache.cache.values())
    assert PatchEntropy(cache_size=0)(he_patches[1]).dtype == np.float32


def test_views_stay_a_pure_function_of_seed_epoch_and_index(he_patches, tmp_path):
    imgs = np.stack([img[:160, :160] for img in he_patches])
    grid = np.array([[0, 0], [1, 0], [0, 1], [1, 1]])
    write_patch_file(tmp_path / "s.h5", imgs, grid * 160, grid)
    make = lambda: PatchDataset(tmp_path / "s.h5", build_sample_transform(_aug(), 2, False, _dense(igu_cache=1)), seed=4)  # noqa: E731
    ds = make()
    order = [2, 2, 0, 3, 3, 1]
    items = [ds[i] for i in order]  # the cache of 1 map hits for the repeats
    for i, item in zip(order, items):
        ref = make()[i]  # always a cache miss
        for key in ("views", "entropy", "geoms"):
            assert all(torch.equal(x, y) for x, y in zip(item[key], ref[key])), key
    batch = collate(items[:3])
    assert len(batch["entropy"]) == 2 and tuple(batch["entropy"][0].shape) == (3, 64, 64)


def test_entropy_maps_only_for_the_igu_sampler_and_unchanged_views_without_adaptive_jitter(he_patches):
    aug = _aug()
    for dense in (None, DenseConfig(), DenseConfig(enabled=True, sampler="arco_sag"), DenseConfig(sampler="igu")):
        transform = build_sample_transform(aug, 2, False, dense)
        assert transform.guide is None and "entropy" not in transform(he_patches[0], np.random.default_rng(0))
    plain = build_sample_transform(aug, 2, True)
    igu = build_sample_transform(aug, 2, True, _dense(igu_adaptive_jitter=False))
    a, b = plain(he_patches[0], np.random.default_rng(7)), igu(he_patches[0], np.random.default_rng(7))
    for key in ("views", "geoms"):
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key]))
    assert torch.equal(a["local"], b["local"]) and "entropy" in b


def test_gpu_augmentation_refuses_the_adaptive_jitter_with_a_config_error(he_patches):
    with pytest.raises(ConfigError, match=r"method\.dense\.igu_adaptive_jitter.*aug\.gpu=false"):
        build_sample_transform(_aug("aug.gpu=true"), 2, False, _dense())
    out = build_sample_transform(_aug("aug.gpu=true"), 2, False, _dense(igu_adaptive_jitter=False))(he_patches[0], np.random.default_rng(0))
    assert out["views"][0].dtype == torch.uint8 and tuple(out["entropy"][0].shape) == (64, 64)


def test_category_thresholds_default_per_map_and_validated():
    assert DenseConfig().category_thresholds == HE_CATEGORY_THRESHOLDS[("rank_disk", "haematoxylin")] == (4.4, 5.4)
    assert DenseConfig(igu_method="box_hist", igu_grey="luminance").category_thresholds == (4.5, 5.0)
    assert DenseConfig(igu_category_thresholds=(3.5, 4.5)).category_thresholds == (3.5, 4.5)
    with pytest.raises(ValueError, match="igu_category_thresholds"):
        DenseConfig(igu_category_thresholds=(5.0, 4.0))
    with pytest.raises(ValueError, match="igu_category_percentiles"):
        DenseConfig(igu_category_percentiles=(30.0, 170.0))
    cfg = load_config(PretrainConfig, None, ["method.dense.igu_category_mode=percentile", "method.dense.igu_category_thresholds=[4, 5]"])
    assert cfg.method.dense.igu_category_thresholds == (4.0, 5.0)


def _two_region_guide(left: int, right: int, size: int = 32) -> np.ndarray:
    """A rendered guide whose left half is category ``left`` and right half category ``right``."""
    g = np.zeros((size, size, 4), np.float32)
    g[:, : size // 2, 1 + left] = 1
    g[:, size // 2 :, 1 + right] = 1
    return g


def test_factor_maps_one_pair_per_category_within_its_range_and_smooth():
    guide = InfoGuide(PatchEntropy(), AdaptiveJitter(), smooth=0.0)
    b, c = guide.factor_maps(_two_region_guide(0, 1), np.random.default_rng(0))
    for region, name in ((np.s_[:, :16], "low"), (np.s_[:, 16:], "medium")):
        assert np.unique(b[region]).size == 1 and np.unique(c[region]).size == 1  # one pair per category and view
        lo, hi = DEFAULT_JITTER_RANGES[name]["brightness"]
        assert lo <= float(b[region][0, 0]) <= hi
        lo, hi = DEFAULT_JITTER_RANGES[name]["contrast"]
        assert lo <= float(c[region][0, 0]) <= hi
    assert b[0, 0] != b[0, 31]
    smooth = InfoGuide(PatchEntropy(), AdaptiveJitter(), smooth=4.0)
    bs, _ = smooth.factor_maps(_two_region_guide(0, 1), np.random.default_rng(0))
    step = np.abs(np.diff(bs, axis=1)).max()
    assert step < 0.3 * abs(float(b[0, 0] - b[0, 31]))  # no hard seam
    assert bs[0, 0] == pytest.approx(b[0, 0], abs=1e-3) and bs[0, 31] == pytest.approx(b[0, 31], abs=1e-3)


class _Maps:
    """A regional jitter with fixed factor maps: brightness 0.5 left / 1.5 right, contrast 1."""

    def factor_maps(self, guide, rng):
        b = np.where(np.arange(guide.shape[1]) < guide.shape[1] // 2, 0.5, 1.5).astype(np.float32)
        return np.broadcast_to(b, guide.shape[:2]), np.ones(guide.shape[:2], np.float32)


def test_regional_factors_replace_the_brightness_and_contrast_draws():
    params = PhotometricParams(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, p_jitter=1.0, p_grey=0.0, p_blur=0.0)
    img = np.full((8, 8, 3), 100, np.uint8)
    out = PhotometricAugment(params, _Maps())(img, np.random.default_rng(0), guide=np.zeros((8, 8, 4), np.float32))
    assert (out[:, :4] == 50).all() and (out[:, 4:] == 150).all()
    # no guide (local crops) or no regional jitter: the plain draws (here: none, identity)
    assert np.array_equal(PhotometricAugment(params, _Maps())(img, np.random.default_rng(0)), img)
    assert np.array_equal(PhotometricAugment(params)(img, np.random.default_rng(0), guide=np.zeros((8, 8))), img)


def _affine_residual(out: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS residual (0-255 units) of the best per-channel affine map ``ref -> out``: ~0 for a global
    brightness/contrast change, large when the factors vary over the image."""
    res = []
    for c in range(3):
        x, y = ref[c].flatten().double(), out[c].flatten().double()
        design = torch.stack([x, torch.ones_like(x)], 1)
        fit = torch.linalg.lstsq(design, y[:, None]).solution
        res.append(float(((design @ fit)[:, 0] - y).pow(2).mean().sqrt()))
    return max(res)


def test_adaptive_jitter_in_the_pipeline_acts_per_region_on_real_patches(he_patches):
    """Only brightness/contrast on: a global jitter is an affine map of the un-jittered view; the
    adaptive jitter is not (its factors follow the entropy categories), and it replaces ``aug``'s."""
    base = ["aug.saturation=0.0", "aug.hue=0.0", "aug.p_jitter=1.0", "aug.p_grey=0.0", "aug.p_blur=0.0", "aug.crop=full",
            "aug.global_size=224", "aug.hflip=0.0", "aug.rotate90=false"]
    off = _aug(*base, "aug.brightness=0.0", "aug.contrast=0.0")
    on = _aug(*base, "aug.brightness=0.3", "aug.contrast=0.3")
    img = he_patches[2]  # stroma: all three categories present; seed 1 draws a global jitter that clips nothing
    plain = build_sample_transform(off, 2, False)(img, np.random.default_rng(1))["views"][0]
    unnorm = lambda v: v.permute(1, 2, 0).mul(torch.tensor([0.229, 0.224, 0.225])).add(torch.tensor([0.485, 0.456, 0.406])).permute(2, 0, 1) * 255  # noqa: E731
    glob = build_sample_transform(on, 2, False)(img, np.random.default_rng(1))["views"][0]
    transform = build_sample_transform(off, 2, False, _dense())
    adaptive = transform(img, np.random.default_rng(1))["views"][0]
    assert set(np.unique(transform.guide(img)[..., 1:].argmax(-1))) == {0, 1, 2}
    assert _affine_residual(unnorm(glob), unnorm(plain)) < 1.0
    assert _affine_residual(unnorm(adaptive), unnorm(plain)) > 3.0
    same_draws = build_sample_transform(on, 2, False, _dense())(img, np.random.default_rng(1))["views"][0]
    assert torch.equal(adaptive, same_draws)  # aug.brightness / aug.contrast play no part in the global views


class _NoLoss(PretrainMethod):
    def forward(self, batch, epoch, step):
        return {"loss": torch.zeros(())}


def test_dense_method_with_igu_needs_the_entropy_maps_of_the_batch():
    class Net(torch.nn.Module):
        num_features = 8

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, 4, 1)

        def forward_features(self, x):
            return self.conv(x)

    method = DenseMethod(_NoLoss(Net()), DenseConfig(enabled=True, sampler="igu", hidden_dim=8, out_dim=4, n_anchors=4))
    g = torch.tensor([[0, 0, 32, 32, 32, 32, 0, 0]], dtype=torch.float32)
    batch = {"views": [torch.randn(1, 3, 32, 32)] * 2, "geoms": [g, g]}
    with pytest.raises(ValueError, match=r"batch\['entropy'\]"):
        method(batch, 0, 0)
    out = method({**batch, "entropy": [torch.rand(1, 32, 32)] * 2}, 0, 0)
    assert float(out["dense_pairs"]) == 4 and out["loss"].requires_grad
