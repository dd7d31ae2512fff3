"""tile_slide on real slides and on synthetic pyramids with known content."""

from __future__ import annotations

import dataclasses
import json

import cv2
import h5py
import numpy as np
import openslide
import pytest

from _tile_fixtures import write_synthetic_slide
from conftest import shared_path
from preprocessing import slide_tiler
from preprocessing.config import TileConfig
from preprocessing.h5format import PatchFile
from preprocessing.readers import open_slide
from preprocessing.qc import PATCH_COLOUR, TISSUE_COLOUR
from preprocessing.slide_tiler import SlideError, params_hash, slide_params_hash, tile_slide


def make_cfg(target_mpp=0.5, patch_size=224, stride=None, codec="raw", **tissue) -> TileConfig:
    cfg = TileConfig()
    cfg.patch.target_mpp, cfg.patch.patch_size, cfg.patch.stride = target_mpp, patch_size, stride
    cfg.output.codec = codec
    for k, v in tissue.items():
        setattr(cfg.tissue, k, v)
    return cfg


def expected_patch(path, x, y, level, read_size, patch_size):
    with open_slide(path) as r:
        region = r.read_region(x, y, level, read_size, read_size)
    if read_size == patch_size:
        return region
    interp = cv2.INTER_AREA if read_size > patch_size else cv2.INTER_CUBIC
    return cv2.resize(region, (patch_size, patch_size), interpolation=interp)


def check_patches_match(h5, slide, max_abs=0, max_mean=0.0):
    pf = PatchFile(h5)
    a = pf.attrs
    coords, grid = pf.coords(), pf.grid()
    assert len(pf) > 0
    for i in range(len(pf)):
        got = pf.read(i)
        want = expected_patch(slide, int(coords[i, 0]), int(coords[i, 1]), int(a["read_level"]),
                              int(a["read_size"]), int(a["patch_size"]))
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= max_abs and diff.mean() <= max_mean, (i, diff.max(), diff.mean())
    return pf, coords, grid


def check_grid_consistent(pf):
    a, coords, grid = pf.attrs, pf.coords(), pf.grid()
    ds, stride_l = float(a["read_downsample"]), float(a["stride_level0"]) / float(a["read_downsample"])
    np.testing.assert_array_equal(coords[:, 0], np.round(np.round(grid[:, 0] * stride_l) * ds).astype(np.int64))
    np.testing.assert_array_equal(coords[:, 1], np.round(np.round(grid[:, 1] * stride_l) * ds).astype(np.int64))
    assert len({tuple(g) for g in grid}) == len(grid)
    order = np.lexsort((grid[:, 0], grid[:, 1]))  # stored row-major
    np.testing.assert_array_equal(order, np.arange(len(grid)))


# -- synthetic slides with known content ------------------------------------------------------

def test_native_resolution_raw_is_pixel_exact(tmp_path):
    slide = write_synthetic_slide(tmp_path / "s.tiff", 1536, 2048, mpp=0.5)
    res = tile_slide(slide, tmp_path / "s.h5", make_cfg(codec="raw"))
    assert (res.read_level, res.achieved_mpp, res.mpp_source) == (0, 0.5, "header:openslide.mpp-x")
    pf, coords, grid = check_patches_match(tmp_path / "s.h5", slide, max_abs=0)
    check_grid_consistent(pf)
    assert res.n_patches == len(pf) and 15 <= res.n_patches <= 45
    assert (pf.tissue_fraction() >= 0.5).all()


def test_downsample_from_pyramid_level(tmp_path):
    """0.25 µm/px slide, 0.5 target: read level 1 (exactly 0.5 µm/px), no resize; coords are level-0."""
    slide = write_synthetic_slide(tmp_path / "s.tiff", 2048, 2048, mpp=0.25)
    res = tile_slide(slide, tmp_path / "s.h5", make_cfg())
    assert res.read_level == 1 and res.achieved_mpp == pytest.approx(0.5)
    pf, coords, _ = check_patches_match(tmp_path / "s.h5", slide, max_abs=0)
    check_grid_consistent(pf)
    assert (coords % 448 == 0).all()  # 224 px at 0.5 µm/px = 448 level-0 px


def test_downsample_resize_path_single_level(tmp_path):
    """No pyramid: read 448 level-0 px and INTER_AREA them to 224."""
    slide = write_synthetic_slide(tmp_path / "s.tiff", 2048, 2048, mpp=0.25, pyramid=False)
    res = tile_slide(slide, tmp_path / "s.h5", make_cfg())
    assert res.read_level == 0
    pf, _, _ = check_patches_match(tmp_path / "s.h5", slide, max_abs=0)
    assert pf.attrs["read_size"] == 448


def test_non_integer_ratio(tmp_path):
    """0.3 → 0.5 µm/px: 373 level-0 px per patch, achieved µm/px recorded exactly (not a nominal magnification)."""
    slide = write_synthetic_slide(tmp_path / "s.tiff", 2048, 2048, mpp=0.3)
    res = tile_slide(slide, tmp_path / "s.h5", make_cfg())
    pf, _, _ = check_patches_match(tmp_path / "s.h5", slide, max_abs=0)
    check_grid_consistent(pf)
    a = pf.attrs
    assert a["read_size"] == 373 and a["patch_size_level0"] == pytest.approx(224 * 0.5 / 0.3)
    assert res.achieved_mpp == pytest.approx(373 * 0.3 / 224) and a["achieved_mpp"] == pytest.approx(res.achieved_mpp)


def test_upsampling_warns(tmp_path):
    slide = write_synthetic_slide(tmp_path / "s.tiff", 1024, 1024, mpp=1.0)
    res = tile_slide(slide, tmp_path / "s.h5", make_cfg(patch_size=128))
    assert any("upsampled" in w for w in res.warnings)
    check_patches_match(tmp_path / "s.h5", slide, max_abs=0)
    assert PatchFile(tmp_path / "s.h5").attrs["read_size"] == 64


def test_jpeg_codec_within_tolerance_and_stride_overlap(tmp_path):
    slide = write_synthetic_slide(tmp_path / "s.tiff", 1536, 2048, mpp=0.5)
    res = tile_slide(slide, tmp_path / "s.h5", make_cfg(codec="jpeg", stride=112))
    pf, _, _ = check_patches_match(tmp_path / "s.h5", slide, max_abs=80, max_mean=3.0)
    assert pf.codec == "jpeg"
    check_grid_consistent(pf)
    ref = tile_slide(slide, tmp_path / "r.h5", make_cfg(codec="raw"))
    assert res.n_patches > 3 * ref.n_patches  # half stride in both axes ≈ 4× the cells
    assert pf.file["coords"].attrs["overlap"] == 112


def test_band_chunking_does_not_change_output(tmp_path, monkeypatch):
    slide = write_synthetic_slide(tmp_path / "s.tiff", 1536, 2048, mpp=0.5)
    tile_slide(slide, tmp_path / "a.h5", make_cfg())
    monkeypatch.setattr(slide_tiler, "MAX_BAND_PIXELS", 224 * 300)  # force one read per patch
    tile_slide(slide, tmp_path / "b.h5", make_cfg())
    a, b = PatchFile(tmp_path / "a.h5"), PatchFile(tmp_path / "b.h5")
    assert b.attrs["n_region_reads"] == len(b) > a.attrs["n_region_reads"]
    np.testing.assert_array_equal(a.coords(), b.coords())
    np.testing.assert_array_equal(a.read_many(range(len(a))), b.read_many(range(len(b))))


def test_zero_patches_writes_empty_file_with_warning(tmp_path):
    from preprocessing.pyramid_writer import write_pyramidal_tiff

    slide = write_pyramidal_tiff(tmp_path / "blank.tiff", np.full((1024, 1024, 3), 245, np.uint8), 0.5)
    res = tile_slide(slide, tmp_path / "blank.h5", make_cfg())
    assert res.n_patches == 0 and any("no patches" in w for w in res.warnings)
    pf = PatchFile(tmp_path / "blank.h5")
    assert len(pf) == 0 and json.loads(pf.attrs["warnings"]) == res.warnings


def test_corrupt_region_raises_and_leaves_no_file(tmp_path):
    slide = write_synthetic_slide(tmp_path / "s.tiff", 2048, 2048, mpp=0.5)
    data = bytearray(slide.read_bytes())
    start = int(len(data) * 0.3)
    data[start:start + 20000] = np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.tiff"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out" / "bad.h5"
    with pytest.raises(SlideError) as info:
        tile_slide(bad, out, make_cfg())
    msg = str(info.value)
    assert str(bad) in msg and "corrupt" in msg.lower()
    assert not out.exists() and not any(p.name.endswith(".tmp") for p in out.parent.iterdir())


def test_params_hash_tracks_output_parameters():
    base = make_cfg()
    h = params_hash(base, "openslide", 0.5)
    assert h == params_hash(make_cfg(), "openslide", 0.5)
    assert h != params_hash(make_cfg(target_mpp=1.0), "openslide", 0.5)
    assert h != params_hash(make_cfg(min_tissue_fraction=0.3), "openslide", 0.5)
    assert h != params_hash(make_cfg(codec="jpeg"), "openslide", 0.5)
    assert h != params_hash(base, "image", 0.5) and h != params_hash(base, "openslide", 0.499)
    no_qc = dataclasses.replace(base, output=dataclasses.replace(base.output, qc=False))
    assert h == params_hash(no_qc, "openslide", 0.5)  # the QC picture does not change the patch file
    no_geojson = dataclasses.replace(base, output=dataclasses.replace(base.output, geojson=False))
    assert h == params_hash(no_geojson, "openslide", 0.5)  # nor the tissue GeoJSON
    assert h != params_hash(base, "openslide", 0.5, roi_sha256="0" * 64)  # an ROI does (tests/test_geojson.py)


# -- real slides ---------------------------------------------------------------------------

def test_cmu_svs_header_mpp_and_qc(tmp_path):
    slide = shared_path("wsi", "cmu-1-small-region.svs")
    res = tile_slide(slide, tmp_path / "cmu.h5", make_cfg(codec="jpeg"), qc_png=tmp_path / "qc" / "cmu.png")
    assert res.status == "done" and res.mpp == pytest.approx(0.499) and res.mpp_source == "header:openslide.mpp-x"
    assert 30 <= res.n_patches <= 70, res.n_patches  # README: ~45 of ~117 tiles have > 50 % tissue
    assert 0.2 < res.tissue_area_mm2 < 1.6  # the slide is 1.1 × 1.5 mm
    qc = cv2.imread(res.qc_png)[..., ::-1]
    assert qc.shape[0] > 500
    assert ((qc == PATCH_COLOUR).all(axis=-1).sum() > 100) and ((qc == TISSUE_COLOUR).all(axis=-1).sum() > 100)
    assert slide_params_hash(slide, make_cfg(codec="jpeg")) == res.params_hash
    with h5py.File(tmp_path / "cmu.h5") as f:
        for key in ("format_version", "slide_id", "source_path", "source_size", "source_mtime", "vendor", "mpp",
                    "mpp_source", "target_mpp", "achieved_mpp", "read_level", "read_downsample", "patch_size",
                    "patch_size_level0", "stride", "tissue_params", "params_hash", "package_version", "seconds_total"):
            assert key in f.attrs, key
        assert f.attrs["vendor"] == "aperio" and f.attrs["params_hash"] == res.params_hash


def test_clam_style_reader_reads_the_same_regions(tmp_path):
    """The way CLAM's Whole_Slide_Bag_FP reads a coords file: patch_level + patch_size from coords attrs,
    read_region at each coord, resize to the encoder's size."""
    slide = shared_path("wsi", "cmu-1-small-region.svs")
    h5 = tmp_path / "cmu.h5"
    tile_slide(slide, h5, make_cfg(codec="raw"))
    wsi = openslide.OpenSlide(str(slide))
    with h5py.File(h5, "r") as f:
        dset = f["coords"]
        patch_level, patch_size = int(dset.attrs["patch_level"]), int(dset.attrs["patch_size"])
        coords = dset[:]
        stored = f["imgs"][:]
        for key in ("downsample", "downsampled_level_dim", "level_dim", "name", "patch_size_level0",
                    "level0_magnification", "target_magnification", "overlap", "level0_width", "level0_height"):
            assert key in dset.attrs, key
    for coord, patch in zip(coords[:10], stored[:10]):
        img = wsi.read_region(tuple(int(v) for v in coord), patch_level, (patch_size, patch_size)).convert("RGB")
        img = cv2.resize(np.asarray(img), (224, 224), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(img, patch)


def test_tcga_jp2k_without_mpp_fails_then_succeeds_with_override(tmp_path):
    slide = shared_path("wsi", "tcga-cr-7395-01a-01-ts1.svs")
    out = tmp_path / "tcga.h5"
    with pytest.raises(SlideError) as info:
        tile_slide(slide, out, make_cfg())
    msg = str(info.value)
    assert str(slide) in msg and "mpp" in msg and "CSV" in msg and "--assume-mpp" in msg
    assert not out.exists()
    res = tile_slide(slide, out, make_cfg(), mpp_override=0.5)
    assert res.mpp_source == "csv" and 120 <= res.n_patches <= 260  # README: ~188 of ~285 tiles
    cfg = make_cfg()
    cfg.assume_mpp = 0.25
    res = tile_slide(slide, tmp_path / "tcga_assume.h5", cfg)
    assert res.mpp_source == "assume-mpp" and res.read_level == 1  # level 1 is 0.5 µm/px


def test_dicom_pyramid_level_choice(tmp_path):
    slide = shared_path("wsi", "dicom-cmu1", "level-0-frames-0-30.dcm")
    res = tile_slide(slide, tmp_path / "d.h5", make_cfg(target_mpp=2.0, patch_size=64))
    pf = PatchFile(tmp_path / "d.h5")
    assert res.read_level == 2 and pf.attrs["vendor"] == "dicom"  # level 2: 0.499 × 4.002 ≈ 1.997 µm/px
    assert pf.attrs["read_downsample"] == pytest.approx(4.0, rel=1e-3)
    assert res.achieved_mpp == pytest.approx(2.0, rel=0.02) and res.n_patches > 0


def test_generic_tiff_fixture_needs_override(tmp_path):
    slide = shared_path("wsi", "openslide-fixtures", "boxes.tiff")
    with pytest.raises(SlideError, match="implausible"):
        tile_slide(slide, tmp_path / "b.h5", make_cfg())
    res = tile_slide(slide, tmp_path / "b.h5", make_cfg(patch_size=32, target_mpp=1.0, min_area_mm2=0.0),
                     mpp_override=0.5)
    assert res.mpp_source == "csv" and res.read_level == 1 and PatchFile(tmp_path / "b.h5").attrs["read_size"] == 32


def test_read_many_any_order_with_repeats(tmp_path):
    slide = write_synthetic_slide(tmp_path / "s.tiff", 1536, 2048, mpp=0.5)
    tile_slide(slide, tmp_path / "s.h5", make_cfg(codec="raw"))
    pf = PatchFile(tmp_path / "s.h5")
    idx = [5, 0, 5, len(pf) - 1, 3, 4, 2]
    got = pf.read_many(idx)
    for k, i in enumerate(idx):
        np.testing.assert_array_equal(got[k], pf.read(i))


def test_patch_stage_memory_does_not_grow_with_slide_size(tmp_path, monkeypatch):
    """A slide with ~6× the patches needs no more memory while patches are read and written: bounded
    bands + 2 write batches, nothing kept per patch. (Bands and batches are made small here so that
    per-patch growth would show; the low-res tissue stage scales with the slide's area at detection_mpp.)"""
    import tracemalloc

    monkeypatch.setattr(slide_tiler, "MAX_BAND_PIXELS", 224 * 224)  # one-patch bands in both slides
    monkeypatch.setattr(slide_tiler, "WRITE_BATCH", 2)  # several batches even in the small slide
    stream, peaks = slide_tiler._stream_patches, []

    def measured(*args, **kwargs):
        tracemalloc.start()
        try:
            return stream(*args, **kwargs)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    monkeypatch.setattr(slide_tiler, "_stream_patches", measured)
    counts = []
    for name, (h, w) in {"small": (1024, 1536), "large": (2048, 3072)}.items():
        slide = write_synthetic_slide(tmp_path / f"{name}.tiff", h, w, mpp=0.5)
        counts.append(tile_slide(slide, tmp_path / f"{name}.h5", make_cfg(codec="raw")).n_patches)
    assert counts[1] > 3 * counts[0] and counts[1] - counts[0] > 20
    assert peaks[1] < peaks[0] + 300e3, (peaks, counts)  # 20 extra patches kept would be 3 MB


def test_slide_smaller_than_a_patch(tmp_path):
    res = tile_slide(shared_path("wsi", "openslide-fixtures", "small.svs"), tmp_path / "s.h5", make_cfg())
    assert res.n_patches == 0 and "smaller than one patch" in res.warnings[0]
    assert len(PatchFile(tmp_path / "s.h5")) == 0


def test_plain_png_through_image_reader(tmp_path):
    from PIL import Image

    from _tile_fixtures import synthetic_he

    img = synthetic_he(1200, 1600)
    path = tmp_path / "plain.png"
    Image.fromarray(img).save(path, dpi=(25400 / 0.5, 25400 / 0.5))  # 0.5 µm/px
    res = tile_slide(path, tmp_path / "plain.h5", make_cfg(codec="raw"))
    pf = PatchFile(tmp_path / "plain.h5")
    assert pf.attrs["reader"] == "image" and res.mpp_source == "header:tiff.XResolution" and res.n_patches > 5
    for i, (x, y) in enumerate(pf.coords()):
        np.testing.assert_array_equal(pf.read(i), img[y:y + 224, x:x + 224])


# -- coordinates only (output.store_pixels=false) and edge cells (patch.edge) ----------------------

def test_params_hash_of_coordinates_only_and_edge_modes():
    base = make_cfg(codec="jpeg")
    assert params_hash(base, "openslide", 0.5) == "c28fbe59558c7ea4"  # the v1 default: earlier files stay valid
    h = params_hash(base, "openslide", 0.5)
    coords_only = make_cfg(codec="jpeg")
    coords_only.output.store_pixels = False
    h_coords = params_hash(coords_only, "openslide", 0.5)
    assert h_coords != h
    coords_only.output.codec = "raw"  # no imgs: the codec changes nothing
    assert params_hash(coords_only, "openslide", 0.5) == h_coords
    hashes = {h}
    for edge in ("pad_white", "pad_black"):
        cfg = make_cfg(codec="jpeg")
        cfg.patch.edge = edge
        hashes.add(params_hash(cfg, "openslide", 0.5))
    assert len(hashes) == 3


def test_coordinates_only_writes_the_cells_without_reading_pixels(tmp_path, monkeypatch):
    """--no-pixels on a real slide: the same cells, grid, tissue fractions and attrs (CLAM/TRIDENT coords
    attrs included) as a stored-pixel run whose background check keeps everything, and no `imgs`."""
    slide = shared_path("wsi", "tcga-cr-7395-01a-01-ts1.svs")
    low = {"min_tissue_fraction": 0.05}  # low enough that the default background check drops some cells
    pixels = tile_slide(slide, tmp_path / "pix.h5", make_cfg(codec="raw", max_background_fraction=1.0, **low),
                        mpp_override=0.5)
    default = tile_slide(slide, tmp_path / "default.h5", make_cfg(codec="raw", **low), mpp_override=0.5)

    def no_patch_reads(*args, **kwargs):
        raise AssertionError("a coordinates-only run must not read patch pixels")

    monkeypatch.setattr(slide_tiler, "_stream_patches", no_patch_reads)
    cfg = make_cfg(codec="raw", **low)
    cfg.output.store_pixels = False
    res = tile_slide(slide, tmp_path / "coords.h5", cfg, mpp_override=0.5)
    assert res.n_patches == pixels.n_patches > 150
    with h5py.File(tmp_path / "pix.h5", "r") as a, h5py.File(tmp_path / "coords.h5", "r") as b:
        assert "imgs" not in b and sorted(b.keys()) == ["coords", "grid", "tissue_fraction"]
        for name in ("coords", "grid", "tissue_fraction"):
            np.testing.assert_array_equal(a[name][:], b[name][:])
        assert dict(a["coords"].attrs).keys() == dict(b["coords"].attrs).keys()
        for key, value in a["coords"].attrs.items():
            np.testing.assert_array_equal(value, b["coords"].attrs[key])
        assert set(a.attrs) == set(b.attrs)
        assert (b.attrs["codec"], bool(b.attrs["store_pixels"]), b.attrs["n_region_reads"]) == ("none", False, 0)
        assert b.attrs["background_check"].startswith("skipped") and a.attrs["background_check"] == "pixels"
        assert b.attrs["params_hash"] == res.params_hash != a.attrs["params_hash"]
    pf = PatchFile(tmp_path / "coords.h5")
    assert not pf.has_pixels and pf.codec == "none" and pf.patch_size == 224 and len(pf) == res.n_patches
    with pytest.raises(Exception, match=r"coords\.h5: coordinates only.*open_source.*without --no-pixels"):
        pf.read(0)
    # the default background check drops cells that a coordinates-only file keeps
    dropped = PatchFile(tmp_path / "default.h5").attrs["n_background_dropped"]
    assert dropped > 0 and default.n_patches + dropped == res.n_patches
    assert PatchFile(tmp_path / "coords.h5").attrs["n_background_dropped"] == 0


def _edge_cells(pf):
    a, c = pf.attrs, pf.coords()
    return (c[:, 0] + a["read_size"] > a["level0_width"]) | (c[:, 1] + a["read_size"] > a["level0_height"])


def test_edge_modes_on_a_real_slide(tmp_path):
    """TCGA at 0.5 µm/px (level 0, 4443 × 3567 px): a 224-px grid has a partial last column (x = 4256,
    187 px inside) and row (y = 3360, 207 px inside). skip drops them; pad_white / pad_black keep the ones
    with enough tissue and fill their outside with 255 / 0; every other patch is the same in all modes."""
    slide = shared_path("wsi", "tcga-cr-7395-01a-01-ts1.svs")
    files = {}
    for edge in ("skip", "pad_white", "pad_black"):
        cfg = make_cfg(codec="raw")
        cfg.patch.edge = edge
        tile_slide(slide, tmp_path / f"{edge}.h5", cfg, mpp_override=0.5)
        files[edge] = PatchFile(tmp_path / f"{edge}.h5")
    skip, white, black = files["skip"], files["pad_white"], files["pad_black"]
    w0, h0 = skip.attrs["level0_width"], skip.attrs["level0_height"]
    assert (w0, h0) == (4443, 3567) and skip.attrs["edge"] == "skip" and black.attrs["edge"] == "pad_black"
    assert not _edge_cells(skip).any()  # nothing crosses the level-0 boundary
    np.testing.assert_array_equal(white.coords(), black.coords())
    edge = _edge_cells(black)
    assert edge.sum() == 8, edge.sum()  # the partial cells with >= 50 % tissue over their whole footprint
    coords = black.coords()
    assert ((coords[edge, 0] == 4256) | (coords[edge, 1] == 3360)).all()
    inside_share = np.minimum((w0 - coords[edge, 0]) / 224, 1) * np.minimum((h0 - coords[edge, 1]) / 224, 1)
    assert (black.tissue_fraction()[edge] <= inside_share + 0.08).all()  # the outside counts as background
    np.testing.assert_array_equal(coords[~edge], skip.coords())
    np.testing.assert_array_equal(black.read_many(np.nonzero(~edge)[0]), skip.read_many(range(len(skip))))
    with open_slide(slide) as r:
        for i in np.nonzero(edge)[0]:
            x, y = (int(v) for v in coords[i])
            iw, ih = min(224, w0 - x), min(224, h0 - y)
            b, w = black.read(i), white.read(i)
            assert (b[ih:] == 0).all() and (b[:, iw:] == 0).all()
            assert (w[ih:] == 255).all() and (w[:, iw:] == 255).all()
            np.testing.assert_array_equal(b[:ih, :iw], w[:ih, :iw])
            np.testing.assert_array_equal(b[:ih, :iw], r.read_region(x, y, 0, iw, ih))


def test_make_grid_edge_cells():
    from preprocessing.grid import make_grid, plan_geometry

    geom = plan_geometry([1.0, 4.0], 0.5, 0.5, 224, 112)  # level 0, 112-px stride
    skip = make_grid(geom, [(1000, 500), (250, 125)], "skip")
    pad = make_grid(geom, [(1000, 500), (250, 125)], "pad_black")
    assert skip.x0.tolist() == [0, 112, 224, 336, 448, 560, 672] and skip.y0.tolist() == [0, 112, 224]
    assert pad.x0.tolist() == skip.x0.tolist() + [784, 896] and pad.y0.tolist() == [0, 112, 224, 336, 448]
    assert make_grid(geom, [(100, 100), (25, 25)], "skip").n_cols == 0
    assert make_grid(geom, [(100, 100), (25, 25)], "pad_white").x0.tolist() == [0]  # smaller than a patch
    with pytest.raises(ValueError, match="patch.edge"):
        make_grid(geom, [(1000, 500)], "pad")
