"""The check: our ``--layout trident`` and ``--layout clam`` outputs, read the way TRIDENT's batch runner
and CLAM's feature extractor / MIL dataset read theirs.

The readers below are our own re-implementations of their documented logic (TRIDENT a91fa84:
``run_batch_of_slides.get_pending_slides``, ``Processor.run_patch_feature_extraction_job``,
``IO.read_coords``, ``WSIPatcher._prepare``, ``WSI.get_best_level_and_custom_downsample``; CLAM 53e2409:
``extract_features_fp.py``, ``Dataset_All_Bags``, ``Whole_Slide_Bag_FP``, ``Generic_MIL_Dataset``); their
code is not imported. Real slide: CMU-1-Small-Region (0.499 µm/px), raw codec so pixels compare exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import shared_path
from evaluation.extract import main as extract_main
from preprocessing.tile import main as tile_main

torch.set_num_threads(1)
SLIDE = "cmu-1-small-region"
ENC = ["--encoder", "test_resnet", "num_workers=0", "progress=false", "batch_size=32"]


@pytest.fixture(scope="module")
def wsi_dir() -> Path:
    return shared_path("wsi", f"{SLIDE}.svs").parent


def _tile(wsi_dir: Path, out: Path, layout: str) -> Path:
    assert tile_main([str(wsi_dir / f"{SLIDE}.svs"), "--out", str(out), "--layout", layout, "--codec", "raw", "-q"]) == 0
    return out


# -- TRIDENT ---------------------------------------------------------------------------------
def trident_coords_dir(mag: float, patch_size: int, overlap: int) -> str:
    return f"{float(mag):g}x_{patch_size}px_{overlap}px_overlap"  # run_batch_of_slides: mag_str


def trident_done(job_dir: Path, coords_dir: str, encoder: str | None = None) -> dict[str, set[str]]:
    """The slide names TRIDENT's batch runner counts as done for its seg, coords and feat tasks."""
    def listdir(p: Path) -> list[str]:
        return os.listdir(p) if p.is_dir() else []

    seg = {os.path.splitext(f)[0] for f in listdir(job_dir / "contours") if f.lower().endswith(".jpg")}
    coords = {os.path.splitext(f)[0][: -len("_patches")] for f in listdir(job_dir / coords_dir / "patches")
              if f.endswith("_patches.h5")}
    feat = set()
    if encoder:
        for sub in (f"features_{encoder}", f"patch_features_{encoder}"):
            feat |= {os.path.splitext(f)[0] for f in listdir(job_dir / coords_dir / sub)
                     if os.path.splitext(f)[1] in (".h5", ".pt")}
    return {"seg": seg, "coords": coords, "feat": feat}


def trident_read_patch(slide, coords_path: Path, index: int) -> np.ndarray:
    """A patch as TRIDENT's feature step reads it from a coords file (before its encoder transform)."""
    with h5py.File(coords_path, "r") as f:  # IO.read_coords
        attrs, coords = dict(f["coords"].attrs), f["coords"][:]
    patch_size, src_mag, dst_mag = (attrs.get(k) for k in ("patch_size", "level0_magnification", "target_magnification"))
    assert None not in (patch_size, src_mag, dst_mag), "TRIDENT would fall back to the legacy CLAM reader"
    downsample = (10 / dst_mag) / (10 / src_mag)
    patch_size_src = round(patch_size * downsample)
    levels = list(slide.level_downsamples)
    level = next((i for i, d in enumerate(levels) if abs(d - downsample) <= 0.1), None)
    if level is None:
        level = max(i for i, d in enumerate(levels) if d <= downsample)
    size = round(patch_size_src / int(levels[level]))
    x, y = (int(v) for v in coords[index])
    return np.asarray(slide.read_region((x, y), level, (size, size)).convert("RGB"))


def test_trident_batch_runner_finds_and_reads_our_job_folder(wsi_dir, tmp_path):
    import openslide

    job = _tile(wsi_dir, tmp_path / "job", "trident")
    coords_dir = trident_coords_dir(20, 224, 0)  # --mag 20 --patch_size 224 --overlap 0 ≙ 0.5 µm/px, 224 px
    done = trident_done(job, coords_dir)
    assert SLIDE in done["coords"] and SLIDE in done["seg"]
    coords_path = job / coords_dir / "patches" / f"{SLIDE}_patches.h5"
    with h5py.File(coords_path, "r") as f:
        attrs, imgs, n = dict(f["coords"].attrs), f["imgs"], len(f["coords"])
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (n, 2) and n > 20
        for key in ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
                    "name", "savetodir", "level0_width", "level0_height"):
            assert key in attrs, key
        assert attrs["name"] == SLIDE and attrs["savetodir"] == str(job / coords_dir) and attrs["overlap"] == 0
        assert attrs["level0_magnification"] == pytest.approx(10 / 0.499)  # exact, not rounded to 20
        stored = [imgs[i] for i in (0, n // 2, n - 1)]
        assert f.attrs["slide_id"] == SLIDE and f.attrs["achieved_mpp"] == pytest.approx(0.5, abs=0.002)  # ours too
    slide = openslide.OpenSlide(str(wsi_dir / f"{SLIDE}.svs"))
    try:
        for i, want in zip((0, n // 2, n - 1), stored):
            np.testing.assert_array_equal(trident_read_patch(slide, coords_path, i), want)
    finally:
        slide.close()

    # `sgcl extract --layout trident` into the coords folder: TRIDENT's feat task sees the slide as done
    assert extract_main(["--inputs", str(job), "--layout", "trident", "--out", str(job / coords_dir), *ENC]) == 0
    assert SLIDE in trident_done(job, coords_dir, "test_resnet")["feat"]
    with h5py.File(job / coords_dir / "features_test_resnet" / f"{SLIDE}.h5", "r") as f:
        feats, coords = f["features"][:], f["coords"][:]
        coords_attrs, feat_attrs = dict(f["coords"].attrs), dict(f["features"].attrs)
    assert feats.shape == (n, 96) and feats.dtype == np.float32 and np.isfinite(feats).all()
    with h5py.File(coords_path, "r") as f:
        np.testing.assert_array_equal(coords, f["coords"][:])
    assert coords_attrs["patch_size_level0"] == attrs["patch_size_level0"]  # the coords attrs travel along
    assert feat_attrs["name"] == SLIDE and feat_attrs["encoder"] == "test_resnet"
    assert feat_attrs["savetodir"] == str(job / coords_dir / "features_test_resnet")
    assert not (job / coords_dir / "pt_files").exists() and not (job / coords_dir / "h5_files").exists()


def test_trident_own_coords_are_read_at_their_magnification(wsi_dir, tmp_path):
    """A coords file as TRIDENT writes it (IO.coords_to_h5: 0.499 µm/px rounded to 20×, patches of 112 px
    at 10×), found in its job folder and read on the fly: 224 level-0 px per patch, resized to 112."""
    from evaluation.sources import discover_inputs, open_source, slide_id_of

    coords_path = tmp_path / "job" / trident_coords_dir(10, 112, 0) / "patches" / f"{SLIDE}_patches.h5"
    coords_path.parent.mkdir(parents=True)
    with h5py.File(coords_path, "w") as f:
        c = f.create_dataset("coords", data=np.array([[0, 0], [224, 0], [448, 224]], np.int64), chunks=(1, 2),
                             maxshape=(None, 2))
        for key, value in {"patch_size": 112, "patch_size_level0": 112 * 20 // 10, "level0_magnification": 20,
                           "target_magnification": 10, "overlap": 0, "name": SLIDE,
                           "savetodir": str(coords_path.parent.parent), "level0_width": 2220,
                           "level0_height": 2967}.items():
            c.attrs[key] = value
    assert discover_inputs([str(tmp_path / "job")]) == [coords_path] and slide_id_of(coords_path, {}) == SLIDE
    source = open_source(coords_path, [str(wsi_dir)])
    desc = source.describe()
    assert desc["read_mode"] == "slide" and desc["patch_size"] == 112 and desc["patch_size_level0"] == 224
    assert desc["read_level"] == 0 and desc["read_size"] == 224 and source[2].shape == (112, 112, 3)


# -- CLAM ------------------------------------------------------------------------------------
def test_clam_feature_extractor_and_mil_dataset_read_our_save_dir(wsi_dir, tmp_path):
    import openslide

    save_dir = _tile(wsi_dir, tmp_path / "clam", "clam")
    assert (save_dir / "masks" / f"{SLIDE}.jpg").is_file() and (save_dir / "stitches" / f"{SLIDE}.jpg").is_file()
    # extract_features_fp.py --data_h5_dir save_dir --data_slide_dir wsi_dir --csv_path process_list_autogen.csv
    bags = pd.read_csv(save_dir / "process_list_autogen.csv")  # Dataset_All_Bags
    assert {"slide_id", "process", "status"} <= set(bags.columns)
    slide_ids = [bags["slide_id"][i].split(".svs")[0] for i in range(len(bags))]
    assert slide_ids == [SLIDE]
    h5_path = save_dir / "patches" / f"{SLIDE}.h5"
    with h5py.File(h5_path, "r") as f:  # Whole_Slide_Bag_FP
        patch_level, patch_size = f["coords"].attrs["patch_level"], f["coords"].attrs["patch_size"]
        coords, imgs = f["coords"][:], f["imgs"]
        picks = (0, len(coords) // 2, len(coords) - 1)
        stored = [imgs[i] for i in picks]
    wsi = openslide.open_slide(str(wsi_dir / f"{SLIDE}.svs"))
    try:
        for i, want in zip(picks, stored):
            img = wsi.read_region(tuple(coords[i]), int(patch_level), (int(patch_size), int(patch_size))).convert("RGB")
            np.testing.assert_array_equal(np.asarray(img), want)
    finally:
        wsi.close()

    # our features from the save_dir, read the way CLAM's Generic_MIL_Dataset reads a bag
    feat_dir = tmp_path / "feats"
    assert extract_main(["--inputs", str(save_dir), "--out", str(feat_dir), *ENC]) == 0
    dataset_csv = pd.DataFrame({"case_id": ["p0"], "slide_id": [SLIDE], "label": ["tumor"]})
    slide_id = dataset_csv["slide_id"][0]
    features = torch.load(os.path.join(feat_dir, "pt_files", f"{slide_id}.pt"))
    with h5py.File(os.path.join(feat_dir, "h5_files", f"{slide_id}.h5"), "r") as f:
        assert torch.equal(features, torch.from_numpy(f["features"][:]))
        np.testing.assert_array_equal(f["coords"][:], coords)
    assert features.shape == (len(coords), 96)
