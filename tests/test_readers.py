"""Slide readers and µm/px resolution on every real slide and on generated images."""

from __future__ import annotations

import builtins

import cv2
import numpy as np
import pytest
from PIL import Image

from _tile_fixtures import synthetic_he, write_synthetic_slide
from conftest import shared_path
from preprocessing.mpp import MppError, mpp_from_header, resolve_mpp
from preprocessing.readers import SlideOpenError, open_slide, reader_class, rgba_to_rgb
from preprocessing.readers.image_reader import ImageReader


def test_cmu_svs():
    with open_slide(shared_path("wsi", "cmu-1-small-region.svs")) as r:
        assert r.name == "openslide" and r.vendor == "aperio"
        assert r.dimensions == (2220, 2967) and r.level_count == 1
        region = r.read_region(100, 200, 0, 64, 32)
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8
        thumb = r.thumbnail(300)
        assert max(thumb.shape[:2]) in (299, 300, 301) and thumb.shape[2] == 3
        assert resolve_mpp(r.path, r.properties).source == "header:openslide.mpp-x"


def test_tcga_jp2k_svs_reads_and_has_no_mpp():
    with open_slide(shared_path("wsi", "tcga-cr-7395-01a-01-ts1.svs")) as r:
        assert r.level_dimensions == ((4443, 3567), (2221, 1783))
        assert r.level_downsamples[1] == pytest.approx(2.0, rel=1e-3)
        assert r.read_region(2000, 1500, 1, 50, 50).std() > 5  # real (decoded JPEG 2000) content
        assert mpp_from_header(r.properties)[0] is None
        with pytest.raises(MppError) as info:
            resolve_mpp(r.path, r.properties)
    msg = str(info.value)
    assert "tcga-cr-7395-01a-01-ts1.svs" in msg and "mpp" in msg and "CSV" in msg and "--assume-mpp" in msg


def test_dicom_pyramid_geometry():
    with open_slide(shared_path("wsi", "dicom-cmu1", "level-0-frames-0-30.dcm")) as r:
        assert r.vendor == "dicom" and r.level_count == 12 and r.dimensions == (2220, 2967)
        for i, (ds, (w, h)) in enumerate(zip(r.level_downsamples, r.level_dimensions)):
            assert w == 2220 // 2**i and h == 2967 // 2**i
            assert ds == pytest.approx((2220 / w + 2967 / h) / 2, rel=1e-9)  # OpenSlide: mean of both axes
            if i <= 5:
                assert ds == pytest.approx(2**i, rel=0.01)
        assert r.best_level_for_downsample(4.0) == 2 and r.best_level_for_downsample(3.9) == 1
        assert r.read_region(0, 0, 3, r.level_dimensions[3][0], r.level_dimensions[3][1]).shape == (370, 277, 3)
        assert resolve_mpp(r.path, r.properties).value == pytest.approx(0.499)


def test_generic_tiff_fixture():
    with open_slide(shared_path("wsi", "openslide-fixtures", "boxes.tiff")) as r:
        assert r.vendor == "generic-tiff" and r.level_dimensions[0] == (300, 250) and r.level_count == 4
        header, ignored = mpp_from_header(r.properties)
        assert header is None and any("352.7" in s for s in ignored)  # the 72-dpi default is not a resolution
        assert resolve_mpp(r.path, r.properties, override=0.5).source == "csv"
        assert resolve_mpp(r.path, r.properties, assume_mpp=0.25).source == "assume-mpp"


def test_small_fixtures_open():
    for parts in (("openslide-fixtures", "small.svs"), ("openslide-fixtures", "boxes_0.dcm")):
        with open_slide(shared_path("wsi", *parts)) as r:
            assert r.dimensions == (16, 16) and r.read_region(0, 0, 0, 16, 16).shape == (16, 16, 3)


def test_outside_the_slide_is_white(tmp_path):
    slide = write_synthetic_slide(tmp_path / "s.tiff", 512, 512, mpp=0.5)
    with open_slide(slide) as r:
        region = r.read_region(480, 480, 0, 64, 64)
        assert (region[40:, :] == 255).all() and (region[:, 40:] == 255).all()
        with ImageReader(tmp_path / "s.tiff") as ir:
            np.testing.assert_array_equal(ir.read_region(480, 480, 0, 64, 64)[40:], region[40:])


def test_rgba_to_rgb_composites_on_white():
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], np.uint8)
    out = rgba_to_rgb(rgba)
    np.testing.assert_array_equal(out[0, 0], [200, 100, 50])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    np.testing.assert_allclose(out[0, 2], [227, 177, 152], atol=1)


def test_image_reader_png_with_alpha_and_dpi(tmp_path):
    img = synthetic_he(600, 800)
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    rgba[:100, :100, 3] = 0
    path = tmp_path / "x.png"
    Image.fromarray(rgba).save(path, dpi=(50800, 50800))  # 0.5 µm/px
    r = open_slide(path)
    assert r.name == "image" and r.dimensions == (800, 600)
    assert r.level_dimensions == ((800, 600), (400, 300)) and r.level_downsamples == (1.0, 2.0)
    assert (r.read_region(0, 0, 0, 100, 100) == 255).all()
    np.testing.assert_array_equal(r.read_region(200, 300, 0, 50, 40), img[300:340, 200:250])
    np.testing.assert_array_equal(r.read_level(1), cv2.resize(r.read_level(0), (400, 300), interpolation=cv2.INTER_AREA))
    mpp = resolve_mpp(path, r.properties)
    assert mpp.value == pytest.approx(0.5, rel=1e-3) and mpp.source == "header:tiff.XResolution"


def test_real_plain_images_open():
    with open_slide(shared_path("images", "he-stardist-histo.jpg")) as r:
        assert r.name == "image" and r.dimensions == (500, 300)
    with open_slide(shared_path("images", "he-tiatoolbox-stain-target.png")) as r:
        assert r.dimensions == (1000, 1000) and r.level_count == 2


def test_read_scaled_matches_full_resize(tmp_path):
    slide = write_synthetic_slide(tmp_path / "s.tiff", 1024, 1024, mpp=0.5, pyramid=False)
    with open_slide(slide) as r:
        full = r.read_level(0)
        small = r.read_scaled(8.0, max_block_pixels=128 * 128)  # 64 blocks of 128 x 128 level px
        assert small.shape == (128, 128, 3)
        ref = cv2.resize(full, (128, 128), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(small, ref)  # block edges fall on output pixel edges: exact
        odd = r.read_scaled(7.3, max_block_pixels=100 * 100)  # block seams inside output pixels
        ref = cv2.resize(full, odd.shape[1::-1], interpolation=cv2.INTER_AREA)
        assert odd.shape == (140, 140, 3) and np.abs(odd.astype(int) - ref).mean() < 1.0


def test_mpp_header_keys_and_priority():
    assert mpp_from_header({"aperio.MPP": "0.2527"})[0].source == "header:aperio.MPP"
    m = mpp_from_header({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.27"})[0]
    assert (m.x, m.y, m.value) == (0.25, 0.27, pytest.approx(0.26))
    m = mpp_from_header({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"})[0]
    assert m.value == pytest.approx(0.25) and m.source == "header:tiff.XResolution"
    assert mpp_from_header({"tiff.XResolution": "101600", "tiff.ResolutionUnit": "inch"})[0].value == pytest.approx(0.25)
    assert mpp_from_header({"tiff.XResolution": "40000"})[0] is None  # no unit: unknown
    exact = resolve_mpp("s.svs", {"openslide.mpp-x": "0.2650"})
    assert exact.value == 0.265  # never rounded to a nominal 40x
    assert resolve_mpp("s.svs", {"openslide.mpp-x": "0.2650"}, override=0.3).source == "csv"
    assert resolve_mpp("s.svs", {"openslide.mpp-x": "0.2650"}, assume_mpp=0.5).source == "header:openslide.mpp-x"
    with pytest.raises(MppError, match="must be > 0"):
        resolve_mpp("s.svs", {}, override=0.0)


def test_unreadable_file_error_names_file(tmp_path):
    bad = tmp_path / "not-a-slide.svs"
    bad.write_bytes(b"garbage" * 100)
    with pytest.raises(SlideOpenError) as info:
        open_slide(bad)
    assert str(bad) in str(info.value) and "openslide" in str(info.value)
    with pytest.raises(SlideOpenError, match="no such file"):
        open_slide(tmp_path / "missing.svs")
    with pytest.raises(ValueError, match="unknown reader"):
        open_slide(bad, reader="bioformats")


def test_tiatoolbox_missing_gives_install_hint(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tia(name, *args, **kwargs):
        if name.startswith("tiatoolbox"):
            raise ImportError("No module named 'tiatoolbox'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tia)
    path = tmp_path / "x.ome.tiff"
    path.write_bytes(b"\0" * 10)
    with pytest.raises(SlideOpenError) as info:
        reader_class("tiatoolbox")(path)
    assert 'pip install -e ".[tia]"' in str(info.value) and str(path) in str(info.value)


def test_openslide_fast_read_equals_public_api():
    """The numpy fast path returns exactly what openslide-python's PIL route gives (incl. outside = white)."""
    with open_slide(shared_path("wsi", "tcga-cr-7395-01a-01-ts1.svs")) as r:
        w, h = r.dimensions
        for x, y, level, rw, rh in [(100, 50, 0, 300, 200), (w - 100, h - 60, 0, 250, 150), (-40, -30, 1, 120, 90)]:
            fast = r.read_region(x, y, level, rw, rh)
            slow = rgba_to_rgb(np.asarray(r._slide.read_region((x, y), level, (rw, rh))))
            np.testing.assert_array_equal(fast, slow)
        assert (r.read_region(w - 10, h - 10, 0, 40, 40)[20:, 20:] == 255).all()


def test_black_background_is_what_openslide_python_and_pil_convert_give():
    """``background="black"`` equals CLAM/TRIDENT's ``read_region(...).convert("RGB")`` pixel for pixel on a
    real slide, for regions crossing the right/bottom edge at level 0 and at the non-integer level 1
    (where OpenSlide returns partly transparent edge pixels)."""
    import openslide

    path = shared_path("wsi", "tcga-cr-7395-01a-01-ts1.svs")
    wsi = openslide.OpenSlide(str(path))
    with open_slide(path) as r:
        assert r.level_downsamples[1] == pytest.approx(2.0005, abs=1e-4)
        for level in (0, 1):
            lw, lh = r.level_dimensions[level]
            ds = r.level_downsamples[level]
            x0, y0 = int(round((lw - 100) * ds)), int(round((lh - 60) * ds))
            rgba = np.asarray(wsi.read_region((x0, y0), level, (224, 224)))
            theirs = np.asarray(wsi.read_region((x0, y0), level, (224, 224)).convert("RGB"))
            outside = rgba[..., 3] == 0
            assert outside[:, 101:].all() and outside[61:, :].all() and not outside[:60, :100].any()
            assert (theirs[outside] == 0).all()  # transparent -> black after convert("RGB")
            black = r.read_region(x0, y0, level, 224, 224, background="black")
            np.testing.assert_array_equal(black, theirs)
            white = r.read_region(x0, y0, level, 224, 224)
            assert (white[outside] == 255).all()
            np.testing.assert_array_equal(white[rgba[..., 3] == 255], theirs[rgba[..., 3] == 255])
            assert ((rgba[..., 3] > 0) & (rgba[..., 3] < 255)).any() == (level == 1)
            # the PIL route (no fast path) gives the same
            np.testing.assert_array_equal(rgba_to_rgb(rgba, "black"), theirs)


def test_image_reader_pads_with_the_background(tmp_path):
    slide = write_synthetic_slide(tmp_path / "s.tiff", 512, 512, mpp=0.5)
    with ImageReader(slide) as ir:
        region = ir.read_region(480, 480, 0, 64, 64, background="black")
        assert (region[32:] == 0).all() and (region[:, 32:] == 0).all() and (region[:32, :32] > 0).any()
