"""Output layouts: the paths of each artefact (ours, TRIDENT's, CLAM's), a cohort run in each, and
finding the patch files of any layout for feature export."""

from __future__ import annotations

import json

from pathlib import Path

import cv2
import h5py
import pandas as pd
import pytest

from _tile_fixtures import write_synthetic_slides
from evaluation.sources import SourceError, discover_inputs, slide_id_of
from preprocessing.cohort import run_cohort
from preprocessing.config import TileConfig
from preprocessing.layouts import (
    FeatureLayout, Layout, LayoutError, patch_files_in, slide_id_from_file_name, trident_job_name,
)
from preprocessing.slide_lists import CLAM_PROCESS_LIST_COLUMNS, discover


def make_cfg(inputs, out, layout: str) -> TileConfig:
    cfg = TileConfig(inputs=[str(i) for i in inputs], out_dir=str(out), workers=0)
    cfg.output.codec, cfg.output.layout = "raw", layout
    return cfg


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    return write_synthetic_slides(tmp_path_factory.mktemp("slides"), 2, 1024, 1280)


def test_trident_job_name_is_exact():
    assert trident_job_name(0.5, 224, None) == "20x_224px_0px_overlap"
    assert trident_job_name(0.25, 256, 224) == "40x_256px_32px_overlap"
    assert trident_job_name(0.3, 224, 224) == "33.3333x_224px_0px_overlap"  # exact, not rounded to 40x
    assert trident_job_name(2.0, 512, None) == "5x_512px_0px_overlap"


def test_layout_paths(tmp_path):
    cfg = make_cfg([], tmp_path, "default")
    d = Layout.for_config(cfg)
    assert d.patch_file("S") == tmp_path / "patches" / "S.h5" and d.qc_picture("S") == tmp_path / "qc" / "S.png"
    assert d.geojson_path("S") == tmp_path / "geojson" / "S.geojson"
    assert d.stitch("S") is None and d.process_list() is None
    assert d.relative(d.qc_picture("S")) == "qc/S.png"

    cfg.output.layout, cfg.patch.stride = "trident", 192
    t = Layout.for_config(cfg)
    job = tmp_path / "20x_224px_32px_overlap"
    assert t.patch_file("S") == job / "patches" / "S_patches.h5"
    assert t.qc_picture("S") == tmp_path / "contours" / "S.jpg"
    assert t.geojson_path("S") == tmp_path / "contours_geojson" / "S.geojson"
    assert set(t.folders()) == {job / "patches", tmp_path / "contours", tmp_path / "contours_geojson"}

    cfg.output.layout = "clam"
    c = Layout.for_config(cfg, root=tmp_path / "other")
    root = tmp_path / "other"
    assert c.patch_file("S") == root / "patches" / "S.h5" and c.qc_picture("S") == root / "masks" / "S.jpg"
    assert c.stitch("S") == root / "stitches" / "S.jpg"
    assert c.process_list() == root / "process_list_autogen.csv"
    assert set(c.folders()) == {root / "patches", root / "masks", root / "stitches", root / "geojson"}
    with pytest.raises(LayoutError, match="unknown layout 'qupath'"):
        Layout("qupath", tmp_path)


def test_feature_layout_paths(tmp_path):
    d = FeatureLayout("default", tmp_path, "resnet50")
    assert d.h5("S") == tmp_path / "h5_files" / "S.h5" and d.pt("S") == tmp_path / "pt_files" / "S.pt"
    assert FeatureLayout("clam", tmp_path, "x").h5("S") == d.h5("S")
    t = FeatureLayout("trident", tmp_path, "uni_v1")
    assert t.h5("S") == tmp_path / "features_uni_v1" / "S.h5" and t.pt("S") is None
    assert FeatureLayout("trident", tmp_path, "/runs/a b").features_dir == tmp_path / "features_runs_a_b"


def test_patch_files_in_any_layout(tmp_path):
    def touch(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        return path

    flat = touch(tmp_path / "flat" / "a.h5")
    touch(tmp_path / "flat" / ".b.h5.123.tmp")
    assert patch_files_in(tmp_path / "flat") == [flat]
    ours = touch(tmp_path / "ours" / "patches" / "a.h5")
    assert patch_files_in(tmp_path / "ours") == [ours]
    tri = touch(tmp_path / "job" / "20x_256px_0px_overlap" / "patches" / "a_patches.h5")
    (tmp_path / "job" / "contours").mkdir()
    assert patch_files_in(tmp_path / "job") == [tri]
    assert slide_id_from_file_name(tri) == "a" and slide_id_of(tri, {}) == "a"
    assert slide_id_of(tri, {"slide_id": "b_patches"}) == "b_patches"  # the attr wins, as written
    touch(tmp_path / "job" / "10x_256px_0px_overlap" / "patches" / "a_patches.h5")
    with pytest.raises(LayoutError, match="several patch folders"):
        patch_files_in(tmp_path / "job")
    with pytest.raises(SourceError, match="several patch folders"):
        discover_inputs([str(tmp_path / "job")])
    assert discover_inputs([str(tmp_path / "job" / "20x_256px_0px_overlap")]) == [tri]


@pytest.mark.parametrize("layout", ["default", "trident", "clam"])
def test_cohort_writes_each_layout_and_resumes(slides, tmp_path, layout):
    out = tmp_path / layout
    cfg = make_cfg([slides], out, layout)
    summary = run_cohort(cfg, progress=False, log=lambda s: None)
    assert summary.count("done") == 2
    lay = Layout.for_config(cfg)
    manifest = pd.read_csv(out / "manifest.csv").set_index("slide_id")
    page = (out / "index.html").read_text()
    for sid in ("s0", "s1"):
        h5, qc = lay.patch_file(sid), lay.qc_picture(sid)
        assert h5.is_file() and qc.is_file() and cv2.imread(str(qc)) is not None
        assert json.loads(lay.geojson_path(sid).read_text())["type"] == "FeatureCollection"
        assert manifest.loc[sid, "qc_png"] == lay.relative(qc) and f'src="{lay.relative(qc)}"' in page
        with h5py.File(h5, "r") as f:
            attrs = f["coords"].attrs
            assert attrs["name"] == sid and attrs["save_path"] == str(h5.parent)
            assert attrs["savetodir"] == str(h5.parent.parent)
            assert manifest.loc[sid, "n_patches"] == len(f["coords"]) > 0
    others = {p.relative_to(out).parts[0] for p in out.iterdir()}
    expected = {"default": {"patches", "qc", "geojson"},
                "trident": {"20x_224px_0px_overlap", "contours", "contours_geojson"},
                "clam": {"patches", "masks", "stitches", "geojson", "process_list_autogen.csv"}}[layout]
    assert others == expected | {"locks", "manifest.csv", "manifest.shard-0-of-1.csv", "index.html"}
    if layout == "clam":
        stitch = cv2.imread(str(lay.stitch("s0")))
        assert stitch is not None and stitch.max() > 0 and (stitch == 0).all(axis=2).any()  # patches on black
        plist = pd.read_csv(out / "process_list_autogen.csv")
        assert list(plist.columns) == CLAM_PROCESS_LIST_COLUMNS
        # CLAM's defaults, not empty cells (NaN columns break CLAM's initialize_df under pandas 3)
        assert plist[["sthresh", "use_otsu", "contour_fn"]].values.tolist() == [[8, False, "four_pt"]] * 2
        assert plist[["slide_id", "process", "status"]].values.tolist() == [["s0.tiff", 0, "processed"],
                                                                             ["s1.tiff", 0, "processed"]]
        # fed back as a slide list, every slide is already processed: nothing left to tile
        notes = []
        assert discover([out / "process_list_autogen.csv"], slide_dir=slides, log=notes.append) == []
        assert any("2 row(s) with process=0 skipped" in n for n in notes)
    again = run_cohort(cfg, progress=False, log=lambda s: None)
    assert again.count("skipped") == 2  # resume finds the files where this layout put them
    if layout == "clam":
        assert set(pd.read_csv(out / "process_list_autogen.csv")["status"]) == {"already_exist"}


def test_feature_files_in_reads_every_layout_by_one_rule(tmp_path):
    from preprocessing.layouts import LayoutError, feature_files_in

    def touch(*names):
        for name in names:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(b"")

    touch("ours/h5_files/a.h5", "ours/pt_files/a.pt", "ours/pt_files/b.pt", "ours/h5_files/.hidden.h5")
    assert [p.relative_to(tmp_path / "ours").as_posix() for p in feature_files_in(tmp_path / "ours")] == [
        "h5_files/a.h5", "pt_files/a.pt", "pt_files/b.pt"]
    assert [p.name for p in feature_files_in(tmp_path / "ours", exts=(".h5",))] == ["a.h5"]
    touch("flat/x.h5", "flat/features_uni_v1/y.h5")  # a folder's own files win over any subfolder
    assert [p.name for p in feature_files_in(tmp_path / "flat")] == ["x.h5"]
    touch("job/features_uni_v1/s1.h5", "job/features_uni_v1/s2.h5")
    assert [p.name for p in feature_files_in(tmp_path / "job")] == ["s1.h5", "s2.h5"]
    touch("job/features_conch_v1/s1.h5")
    with pytest.raises(LayoutError, match="several TRIDENT feature folders.*features_conch_v1.*features_uni_v1"):
        feature_files_in(tmp_path / "job")
    (tmp_path / "empty").mkdir()
    assert feature_files_in(tmp_path / "empty") == []
