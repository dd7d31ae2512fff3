"""Slide lists: our CSV, TRIDENT's (`wsi[,mpp]`), CLAM's (`slide_id`, process lists), per-slide config
overrides checked like a config file, and a cohort run that tiles each slide with its own settings."""

from __future__ import annotations

from pathlib import Path

import h5py
import pandas as pd
import pytest

from _tile_fixtures import write_synthetic_slides
from preprocessing.cohort import run_cohort
from preprocessing.config import TileConfig
from preprocessing.slide_lists import CohortError, SlideJob, discover, job_config, read_slide_list
from preprocessing.tile import main


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    return write_synthetic_slides(tmp_path_factory.mktemp("wsis"), 3, 1024, 1152)


def write_csv(path: Path, columns: dict) -> Path:
    pd.DataFrame(columns).to_csv(path, index=False)
    return path


def test_trident_list_relative_to_wsi_dir(slides, tmp_path):
    csv = write_csv(tmp_path / "list.csv", {"wsi": ["s0.tiff", str(slides / "s1.tiff")], "mpp": [0.25, None]})
    jobs = discover([csv], slide_dir=slides)
    assert [(j.slide_id, j.path, j.mpp) for j in jobs] == [("s0", slides / "s0.tiff", 0.25), ("s1", slides / "s1.tiff", None)]
    with pytest.raises(CohortError) as info:  # without --wsi-dir, names are relative to the CSV
        discover([csv])
    assert "row 2" in str(info.value) and "s0.tiff does not exist" in str(info.value) and "--slide-dir" in str(info.value)


def test_clam_lists_slide_id_ext_and_process(slides, tmp_path):
    notes: list[str] = []
    dataset = write_csv(tmp_path / "dataset.csv", {"case_id": ["p0", "p1"], "slide_id": ["s0", "s2"],
                                                   "label": ["tumor", "normal"]})
    jobs = discover([dataset], slide_dir=slides, slide_ext=".tiff", log=notes.append)
    assert [(j.slide_id, j.path.name) for j in jobs] == [("s0", "s0.tiff"), ("s2", "s2.tiff")]
    assert any("case_id, label ignored" in n for n in notes)
    # without --slide-ext, the one slide file named <id>.<ext> is found
    assert [j.path for j in discover([dataset], slide_dir=slides)] == [slides / "s0.tiff", slides / "s2.tiff"]
    with pytest.raises(CohortError, match=r"row 2: no single slide file named s0.<ext>.*--slide-ext"):
        discover([dataset])  # the CSV's folder has no slides

    notes.clear()
    plist = write_csv(tmp_path / "process_list_autogen.csv", {
        "slide_id": ["s0.tiff", "s1.tiff", "s2.tiff"], "process": [1, 0, 1], "status": ["tbp", "processed", "tbp"],
        "seg_level": [-1, -1, -1], "sthresh": [8, 8, 8], "mthresh": [7, 7, 7], "contour_fn": ["four_pt"] * 3})
    jobs = discover([plist], slide_dir=slides, log=notes.append)
    assert [j.slide_id for j in jobs] == ["s0", "s2"]  # process = 0: skipped, as CLAM does
    assert any("1 row(s) with process=0 skipped" in n for n in notes)
    assert any("contour_fn, mthresh, seg_level, status, sthresh ignored" in n for n in notes)


def test_per_slide_config_columns_are_checked(slides, tmp_path):
    csv = write_csv(tmp_path / "c.csv", {"path": [str(slides / "s0.tiff"), str(slides / "s1.tiff")],
                                         "patch.patch_size": [128, None], "tissue.pen_filter": ["false", ""],
                                         "assume_mpp": [None, 0.3]})
    jobs = read_slide_list(csv)
    assert jobs[0].overrides == (("patch.patch_size", 128), ("tissue.pen_filter", False))
    assert jobs[1].overrides == (("assume_mpp", 0.3),)  # empty cells keep the run's setting
    assert jobs[0].origin == f"{csv}, row 2"
    base = TileConfig(out_dir="x")
    base.patch.target_mpp = 1.0
    one = job_config(base, jobs[0])
    assert one.patch.patch_size == 128 and one.tissue.pen_filter is False and one.patch.target_mpp == 1.0
    assert base.patch.patch_size == 224  # the run's config is untouched
    assert job_config(base, SlideJob("x", Path("x"))) is base

    bad = write_csv(tmp_path / "bad.csv", {"path": [str(slides / "s0.tiff")] * 2, "slide_id": ["a", "b"],
                                           "patch.patch_size": ["", "big"]})
    with pytest.raises(CohortError) as info:
        read_slide_list(bad)
    assert f"{bad}, row 3, column `patch.patch_size`" in str(info.value) and "expected an integer" in str(info.value)
    write_csv(bad, {"path": [str(slides / "s0.tiff")], "tissue.method": ["magic"]})
    with pytest.raises(CohortError, match=r"row 2, column `tissue.method`: .*not one of"):
        read_slide_list(bad)
    write_csv(bad, {"path": [str(slides / "s0.tiff")], "patch.size": [1], "colour": ["x"]})
    with pytest.raises(CohortError, match=r"unknown column\(s\) \['colour', 'patch.size'\]"):
        read_slide_list(bad)
    write_csv(bad, {"path": [str(slides / "s0.tiff")], "workers": [4]})
    with pytest.raises(CohortError, match=r"\['workers'\] set a cohort-wide option"):
        read_slide_list(bad)
    write_csv(bad, {"path": [str(slides / "s0.tiff")], "wsi": ["s0.tiff"]})
    with pytest.raises(CohortError, match="both `path` and `wsi`"):
        read_slide_list(bad)
    write_csv(bad, {"path": [str(slides / "s0.tiff")], "process": ["maybe"]})
    with pytest.raises(CohortError, match="row 2: process 'maybe' is not 0 or 1"):
        read_slide_list(bad)
    twice = write_csv(tmp_path / "twice.csv", {"path": [str(slides / "s0.tiff")] * 2, "patch.patch_size": [128, 256]})
    with pytest.raises(CohortError, match="listed twice with different settings"):
        discover([twice])


def test_each_slide_tiled_with_its_own_settings_and_resumed_per_slide(slides, tmp_path):
    csv = tmp_path / "cohort.csv"
    write_csv(csv, {"path": [str(slides / f"s{i}.tiff") for i in range(3)],
                    "patch.patch_size": [128, None, None], "tissue.min_tissue_fraction": [None, 0.9, None]})
    out = tmp_path / "tiles"
    cfg = TileConfig(inputs=[str(csv)], out_dir=str(out), workers=0)
    cfg.output.codec, cfg.output.qc = "raw", False
    assert run_cohort(cfg, progress=False, log=lambda s: None).count("done") == 3

    def attrs(sid: str) -> dict:
        with h5py.File(out / "patches" / f"{sid}.h5", "r") as f:
            return {"patch_size": int(f.attrs["patch_size"]), "hash": f.attrs["params_hash"],
                    "n": int(f.attrs["n_patches"]), "mtime": (out / "patches" / f"{sid}.h5").stat().st_mtime_ns}

    first = {sid: attrs(sid) for sid in ("s0", "s1", "s2")}
    assert [first[s]["patch_size"] for s in ("s0", "s1", "s2")] == [128, 224, 224]
    assert len({first[s]["hash"] for s in first}) == 3  # one params hash per slide
    assert first["s1"]["n"] < first["s2"]["n"]  # 0.9 tissue fraction keeps fewer patches than 0.5

    summary = run_cohort(cfg, progress=False, log=lambda s: None)
    assert summary.count("skipped") == 3  # each slide is resumed with its own settings
    write_csv(csv, {"path": [str(slides / f"s{i}.tiff") for i in range(3)],
                    "patch.patch_size": [128, None, 160], "tissue.min_tissue_fraction": [None, 0.9, None]})
    summary = run_cohort(cfg, progress=False, log=lambda s: None)
    assert {r["slide_id"]: r["status"] for r in summary.rows} == {"s0": "skipped", "s1": "skipped", "s2": "done"}
    assert attrs("s2")["patch_size"] == 160 and attrs("s0")["mtime"] == first["s0"]["mtime"]


def test_cli_dry_run_lists_overrides_and_bad_csv_exits_2(slides, tmp_path, capsys):
    csv = write_csv(tmp_path / "list.csv", {"wsi": ["s0.tiff", "s1.tiff"], "patch.target_mpp": [1.0, None]})
    assert main([str(csv), "--wsi-dir", str(slides), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"s0\t{slides / 's0.tiff'}\tpatch.target_mpp=1.0", f"s1\t{slides / 's1.tiff'}"]
    write_csv(csv, {"wsi": ["s0.tiff"], "patch.target_mpp": ["fast"]})
    assert main([str(csv), "--wsi-dir", str(slides), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{csv}, row 2, column `patch.target_mpp`" in err and "expected a number" in err


def test_roi_pixels_and_edge_columns_per_slide(slides, tmp_path):
    """The `roi`, `output.store_pixels` and `patch.edge` keys work as per-slide columns like any other."""
    import json

    roi = tmp_path / "left_half.geojson"  # given relative to the CSV's folder, like `path`
    ring = [[0, 0], [512, 0], [512, 1152], [0, 1152], [0, 0]]
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}}]}))
    csv = write_csv(tmp_path / "cohort.csv", {"path": [str(slides / f"s{i}.tiff") for i in range(3)],
                                              "roi": [roi.name, None, None],
                                              "output.store_pixels": [None, "false", None],
                                              "patch.edge": [None, None, "pad_black"]})
    out = tmp_path / "tiles"
    cfg = TileConfig(inputs=[str(csv)], out_dir=str(out), workers=0)
    cfg.patch.patch_size, cfg.output.qc = 96, False
    assert run_cohort(cfg, progress=False, log=lambda s: None).count("done") == 3
    files = {s: h5py.File(out / "patches" / f"{s}.h5", "r") for s in ("s0", "s1", "s2")}
    try:
        size0 = float(files["s0"].attrs["patch_size_level0"])
        assert len(files["s0"]["coords"]) > 0 and (files["s0"]["coords"][:, 0] + size0 <= 512 + size0 / 2).all()
        assert files["s0"].attrs["roi_path"] == str(roi.resolve()) and files["s1"].attrs["roi_path"] == ""
        assert "imgs" not in files["s1"] and "imgs" in files["s0"] and "imgs" in files["s2"]
        assert files["s2"].attrs["edge"] == "pad_black" and files["s0"].attrs["edge"] == "skip"
        right = files["s2"]["coords"][:, 0].max() + size0
        assert right > 1024  # 1024 is not a multiple of 96: padded cells cross the right edge
    finally:
        for f in files.values():
            f.close()
