"""Flat-patch warning (issue 13, item 12) and readable QC pictures of tiny slides (item 14).

The DICOM demo pyramid (``dicom-cmu1``) decodes with wrong colours: its background is not white, so
tissue detection keeps it and 52 of its 72 kept patches are one flat colour. The same region as SVS
(the demo slide) has none.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from conftest import shared_path
from preprocessing.h5format import PatchFile
from preprocessing.qc import QC_MAX_ENLARGED, QC_MIN_WIDTH, render_qc
from preprocessing.tissue import dominant_colour_fraction
from sgcl.cli import main

DICOM = ("wsi", "dicom-cmu1", "level-0-frames-0-30.dcm")


def test_dominant_colour_fraction_separates_flat_from_textured_patches():
    rng = np.random.default_rng(0)
    flat = np.full((64, 64, 3), (240, 128, 130), np.uint8) + rng.integers(0, 6, (64, 64, 3), dtype=np.uint8)
    mostly = flat.copy()
    mostly[:, :13] = 40  # 20 % of the pixels another colour
    textured = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    frac = dominant_colour_fraction(np.stack([flat, mostly, textured]), tolerance=12)
    assert frac[0] == 1.0 and 0.75 < frac[1] < 0.85 and frac[2] < 0.05
    assert dominant_colour_fraction(np.zeros((0, 64, 64, 3), np.uint8), 12).shape == (0,)


def test_dicom_pyramid_warns_of_flat_patches_everywhere_it_shows(tmp_path, capfd):
    slide = shared_path(*DICOM)
    out = tmp_path / "tiles"
    assert main(["tile", str(slide), "--out", str(out), "--workers", "0", "-q"]) == 0
    printed = capfd.readouterr().out
    assert "72 patches written" in printed and "52 of them flat (one colour)" in printed
    assert re.search(r"FLAT level-0-frames-0-30: 52 of 72 kept patches \(72%\) are one flat colour", printed)
    row = pd.read_csv(out / "manifest.csv").iloc[0]
    assert row["flat_fraction"] == pytest.approx(52 / 72)
    assert row["warning"].startswith("mostly flat patches: 52 of 72")
    with PatchFile(out / "patches" / "level-0-frames-0-30.h5") as pf:
        assert pf.attrs["n_flat"] == 52 and pf.attrs["flat_check"].startswith("pixels")
    page = (out / "index.html").read_text()
    assert "mostly flat<b>1</b>" in page and '<td class="num flat">72%</td>' in page
    # a re-run skips the slide and judges its recorded flat count with this run's threshold
    assert main(["tile", str(slide), "--out", str(out), "--workers", "0", "-q", "output.flat_warn_fraction=0.8"]) == 0
    row = pd.read_csv(out / "manifest.csv").iloc[0]
    assert row["status"] == "skipped" and "mostly flat" not in row["warning"]
    assert row["flat_fraction"] == pytest.approx(52 / 72)


def test_dicom_pyramid_without_pixels_says_the_check_was_skipped(tmp_path, capfd):
    slide = shared_path(*DICOM)
    out = tmp_path / "coords"
    assert main(["tile", str(slide), "--out", str(out), "--workers", "0", "-q", "--no-pixels", "--no-qc"]) == 0
    assert "flat-patch check skipped: coordinates only (--no-pixels)" in capfd.readouterr().out
    row = pd.read_csv(out / "manifest.csv").iloc[0]
    assert pd.isna(row["flat_fraction"]) and pd.isna(row["warning"])
    with PatchFile(out / "patches" / "level-0-frames-0-30.h5", validate=False) as pf:
        assert pf.attrs["n_flat"] == -1 and pf.attrs["flat_check"].startswith("skipped")


def test_demo_svs_has_no_flat_warning(tmp_path, capfd, demo_slide):
    out = tmp_path / "tiles"
    assert main(["tile", str(demo_slide), "--out", str(out), "--workers", "0", "-q", "--no-qc", "--no-geojson"]) == 0
    assert "0 of them flat" in capfd.readouterr().out
    row = pd.read_csv(out / "manifest.csv").iloc[0]
    assert row["n_patches"] > 0 and row["flat_fraction"] == 0.0 and pd.isna(row["warning"])


@pytest.mark.parametrize("shape,thumb_height", [((12, 16), 360), ((1024, 10), 1024), ((300, 700), 300)],
                         ids=["tiny-enlarged-x30", "thin-padded", "normal-unchanged"])
def test_qc_picture_is_wide_enough_for_its_caption(shape, thumb_height):
    th, tw = shape
    thumb = np.full((th, tw, 3), 230, np.uint8)
    caption = "small: 0 patches 224px at 0.5 um/px | slide 0.499 um/px (header:openslide.mpp-x) | tissue 0.00 mm2"
    img = render_qc(thumb, (tw * 4, th * 4), None, np.zeros((0, 2)), 224.0, caption)
    assert img.shape[1] == max(QC_MIN_WIDTH, tw) and thumb_height <= QC_MAX_ENLARGED
    caption_bar = img.shape[0] - thumb_height
    assert 0 < caption_bar <= 2 * 21 + 6, "the caption takes at most two lines (15-21 px each)"


def test_qc_picture_outlines_flat_patches_in_their_own_colour():
    from preprocessing.qc import FLAT_COLOUR, PATCH_COLOUR

    thumb = np.full((100, 200, 3), 230, np.uint8)
    coords = np.array([[0, 0], [400, 0]])
    img = render_qc(thumb, (800, 400), None, coords, 200.0, "x", flat=np.array([True, False]))
    colours = {tuple(int(v) for v in c) for c in img.reshape(-1, 3)}
    assert FLAT_COLOUR in colours and PATCH_COLOUR in colours
