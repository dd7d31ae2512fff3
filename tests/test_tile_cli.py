"""``sgcl tile`` end to end: demo slide, missing µm/px and its two fixes, config precedence, report."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO, shared_path
from preprocessing.h5format import PatchFile
from preprocessing.report import render_report
from preprocessing.tile import main, parse_config
from sgcl.cli import main as sgcl_main


def test_demo_slide_end_to_end(demo_slide, tmp_path, capsys):
    slide = tmp_path / "in" / demo_slide.name
    slide.parent.mkdir()
    shutil.copy(demo_slide, slide)
    out = tmp_path / "tiles"
    assert sgcl_main(["tile", str(slide), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "1 done" in printed and "0 failed" in printed

    h5, qc = out / "patches" / "CMU-1-Small-Region.h5", out / "qc" / "CMU-1-Small-Region.png"
    assert h5.is_file() and qc.is_file() and qc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = pd.read_csv(out / "manifest.csv")
    assert len(manifest) == 1
    row = manifest.iloc[0]
    with PatchFile(h5) as pf:
        n, attrs = len(pf), pf.attrs
        assert pf.read(0).shape == (224, 224, 3)
    assert row["status"] == "done" and n > 0 and row["n_patches"] == n == attrs["n_patches"]
    assert row["mpp"] == pytest.approx(0.499) and row["mpp_source"].startswith("header:")
    assert row["achieved_mpp"] == pytest.approx(attrs["achieved_mpp"])
    assert row["tissue_area_mm2"] == pytest.approx(attrs["tissue_area_mm2"]) and row["tissue_area_mm2"] > 0
    assert row["params_hash"] == attrs["params_hash"] and row["qc_png"] == "qc/CMU-1-Small-Region.png"
    assert f"{n} patches" in printed

    page = (out / "index.html").read_text()
    assert 'src="qc/CMU-1-Small-Region.png"' in page and "<script" not in page
    assert re.search(rf'<td class="num">{n}</td>', page)
    assert f"{row['tissue_area_mm2']:.2f}" in page and "0.499" in page and "header:openslide.mpp-x" in page
    assert re.search(rf"patches<b>{n}</b>", page) and "done<b>1</b>" in page and "failed<b>0</b>" in page


def test_missing_mpp_fails_with_both_fixes_then_csv_override(tmp_path):
    tcga = shared_path("wsi", "tcga-cr-7395-01a-01-ts1.svs")
    out = tmp_path / "tiles"
    assert main([str(tcga), "--out", str(out), "-q", "--no-qc"]) == 1
    row = pd.read_csv(out / "manifest.csv").iloc[0]
    assert row["status"] == "failed"
    assert str(tcga) in row["error"] and "mpp" in row["error"]
    assert "--assume-mpp" in row["error"] and "CSV" in row["error"]  # both ways to fix it
    assert not list((out / "patches").glob("*.h5"))

    csv = tmp_path / "cohort.csv"
    pd.DataFrame({"path": [str(tcga)], "mpp": [0.2527]}).to_csv(csv, index=False)
    assert main([str(csv), "--out", str(out), "-q", "--no-qc"]) == 0
    row = pd.read_csv(out / "manifest.csv").iloc[0]
    assert row["status"] == "done" and row["mpp_source"] == "csv" and row["mpp"] == pytest.approx(0.2527)
    with PatchFile(out / "patches" / "tcga-cr-7395-01a-01-ts1.h5") as pf:
        assert len(pf) == row["n_patches"] > 0 and pf.attrs["mpp"] == pytest.approx(0.2527)


def test_assume_mpp_and_csv_priority(tmp_path):
    tcga = shared_path("wsi", "tcga-cr-7395-01a-01-ts1.svs")
    cmu = shared_path("wsi", "cmu-1-small-region.svs")
    out = tmp_path / "tiles"
    assert main([str(tcga), str(cmu), "--out", str(out), "-q", "--no-qc", "--assume-mpp", "0.25"]) == 0
    rows = pd.read_csv(out / "manifest.csv").set_index("slide_id")
    assert rows.loc["tcga-cr-7395-01a-01-ts1", "mpp_source"] == "assume-mpp"
    assert rows.loc["tcga-cr-7395-01a-01-ts1", "mpp"] == 0.25
    assert rows.loc["cmu-1-small-region", "mpp_source"].startswith("header:")  # the header wins over assume

    csv = tmp_path / "c.csv"
    pd.DataFrame({"path": [str(tcga)], "slide_id": ["tcga"], "mpp": [0.3]}).to_csv(csv, index=False)
    assert main([str(csv), "--out", str(tmp_path / "t2"), "-q", "--no-qc", "--assume-mpp", "0.25"]) == 0
    row = pd.read_csv(tmp_path / "t2" / "manifest.csv").iloc[0]
    assert (row["slide_id"], row["mpp_source"], row["mpp"]) == ("tcga", "csv", 0.3)  # the CSV wins over assume


def test_config_file_overrides_and_flags(tmp_path):
    cfg, _ = parse_config(["a.svs", "b_dir", "--config", str(REPO / "configs/tile/20x_256.yaml"),
                           "tissue.pen_filter=false", "output.jpeg_quality=80", "--patch-size", "128",
                           "--shard", "1/3", "--workers", "2", "--min-tissue", "0.3", "--out", str(tmp_path),
                           "--slide-timeout", "600", "--roi", "annotations/", "--no-geojson"])
    assert cfg.inputs == ["a.svs", "b_dir"] and cfg.out_dir == str(tmp_path)
    assert cfg.patch.patch_size == 128 and cfg.patch.target_mpp == 0.5  # flag beats the config file
    assert cfg.tissue.pen_filter is False and cfg.output.jpeg_quality == 80
    assert cfg.shard == "1/3" and cfg.workers == 2 and cfg.tissue.min_tissue_fraction == 0.3
    assert cfg.overwrite is False and cfg.output.qc is True and cfg.slide_timeout_s == 600.0
    assert cfg.roi == "annotations/" and cfg.roi_exclude_class == "exclude" and cfg.output.geojson is False
    assert parse_config(["a.svs"])[0].output.geojson is True and parse_config(["a.svs"])[0].roi is None
    for preset in sorted((REPO / "configs" / "tile").glob("*.yaml")):
        parse_config(["x.svs", "--config", str(preset)])


def test_bad_arguments_exit_2_naming_the_problem(tmp_path, capsys):
    slide = shared_path("wsi", "cmu-1-small-region.svs")
    assert main([str(slide), "--out", str(tmp_path), "patch.patchsize=3"]) == 2
    assert "patch.patchsize" in capsys.readouterr().err
    assert main([str(slide), "--out", str(tmp_path), "patch.patch_size=big"]) == 2
    assert "patch.patch_size" in capsys.readouterr().err
    assert main([str(tmp_path / "nope.svs"), "--out", str(tmp_path)]) == 2
    assert "nope.svs does not exist" in capsys.readouterr().err
    assert main([str(slide), "--out", str(tmp_path), "--shard", "2/2"]) == 2
    assert main(["--out", str(tmp_path)]) == 2
    assert "no inputs" in capsys.readouterr().err


def test_dry_run_lists_the_shard(tmp_path, capsys):
    folder = shared_path("wsi", "openslide-fixtures")
    assert main([str(folder), "--dry-run", "--shard", "0/2", "--out", str(tmp_path / "o")]) == 0
    first = capsys.readouterr().out.split()
    assert main([str(folder), "--dry-run", "--shard", "1/2", "--out", str(tmp_path / "o")]) == 0
    second = capsys.readouterr().out.split()
    ids0, ids1 = set(first[::2]), set(second[::2])
    assert ids0.isdisjoint(ids1) and ids0 | ids1 == {"boxes", "boxes_0", "small"}
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def _rect(x0, y0, x1, y1):
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]


def test_roi_folder_tissue_geojson_and_resume(tmp_path):
    cmu = shared_path("wsi", "cmu-1-small-region.svs")
    slides, rois, out = tmp_path / "slides", tmp_path / "rois", tmp_path / "tiles"
    slides.mkdir()
    rois.mkdir()
    for name in ("a.svs", "b.svs"):
        shutil.copy(cmu, slides / name)
    # QuPath's older "Export as GeoJSON": a bare array of features, classification as a plain string
    roi_a = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": _rect(0, 0, 2220, 1500)},
              "properties": {"classification": "Tumor"}},
             {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": _rect(0, 0, 2220, 500)},
              "properties": {"classification": "exclude"}}]
    (rois / "a.geojson").write_text(json.dumps(roi_a))
    argv = [str(slides), "--out", str(out), "--roi", str(rois), "-q", "--no-qc"]
    assert main(argv) == 0
    rows = pd.read_csv(out / "manifest.csv").set_index("slide_id")
    assert (rows["status"] == "done").all()
    assert 0 < rows.loc["a", "n_patches"] < rows.loc["b", "n_patches"]
    assert "has no b.geojson" in rows.loc["b", "warning"] and pd.isna(rows.loc["a", "warning"])
    with PatchFile(out / "patches" / "a.h5") as pf:
        y = pf.coords()[:, 1]
        assert pf.attrs["roi_path"] == str((rois / "a.geojson").resolve())
        assert y.min() >= 500 - 0.5 * pf.attrs["patch_size_level0"] and y.max() < 1500
    tissue = json.loads((out / "geojson" / "a.geojson").read_text())
    ys = [p[1] for f in tissue["features"] for ring in f["geometry"]["coordinates"] for p in ring]
    assert tissue["type"] == "FeatureCollection" and tissue["features"] and 450 <= min(ys) and max(ys) <= 1550
    b_geojson = (out / "geojson" / "b.geojson").read_bytes()
    assert max(p[1] for f in json.loads(b_geojson)["features"] for r in f["geometry"]["coordinates"] for p in r) > 2500

    # resume: a tissue GeoJSON missing beside a finished patch file is written without re-tiling
    (out / "geojson" / "b.geojson").unlink()
    assert main(argv) == 0
    rows = pd.read_csv(out / "manifest.csv").set_index("slide_id")
    assert (rows["status"] == "skipped").all() and (out / "geojson" / "b.geojson").read_bytes() == b_geojson
    # an edited annotation redoes that slide; a new per-slide file redoes the slide it names
    roi_a[1]["geometry"]["coordinates"] = _rect(0, 0, 2220, 800)
    (rois / "a.geojson").write_text(json.dumps(roi_a))
    (rois / "b.json").write_text(json.dumps({"type": "Feature", "properties": {"classification": {"name": "Exclude"}},
                                             "geometry": {"type": "Polygon", "coordinates": _rect(0, 1500, 2220, 2967)}}))
    assert main(argv) == 0
    redone = pd.read_csv(out / "manifest.csv").set_index("slide_id")
    assert (redone["status"] == "done").all()
    assert redone.loc["a", "n_patches"] < rows.loc["a", "n_patches"]
    assert redone.loc["b", "n_patches"] < rows.loc["b", "n_patches"]
    # a missing ROI path fails every slide with the path in the error
    assert main([str(slides), "--out", str(tmp_path / "t2"), "--roi", str(tmp_path / "nope.geojson"), "-q"]) == 1
    failed = pd.read_csv(tmp_path / "t2" / "manifest.csv")
    assert (failed["status"] == "failed").all() and failed["error"].str.contains("nope.geojson does not exist").all()


def test_module_entry_point_help():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "preprocessing.tile", "--help"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and "--target-mpp" in proc.stdout and "--shard" in proc.stdout
    assert "--roi PATH" in proc.stdout and "--no-geojson" in proc.stdout


def test_report_escapes_and_counts(tmp_path):
    table = pd.DataFrame([
        {"slide_id": "a<b>", "path": "/x/a.svs", "status": "failed", "error": "<script>alert(1)</script>"},
        {"slide_id": "c", "path": "/x/c.svs", "status": "done", "n_patches": 0, "warning": "no patches",
         "tissue_area_mm2": 0.0, "qc_png": "qc/missing.png"},
        {"slide_id": "d", "path": "/x/d.svs", "status": "done", "n_patches": 12, "tissue_area_mm2": 1.5, "mpp": 0.25,
         "mpp_source": "csv"},
    ])
    page = render_report(table, tmp_path)
    assert "<script>" not in page and "&lt;script&gt;" in page and "a&lt;b&gt;" in page
    assert "zero patches<b>1</b>" in page and "patches<b>12</b>" in page and "failed<b>1</b>" in page
    assert "qc/missing.png" not in page  # no broken image links


def test_no_pixels_and_edge_flags(demo_slide, tmp_path, capsys):
    cfg, _ = parse_config(["a.svs", "--no-pixels", "--edge", "pad_black"])
    assert cfg.output.store_pixels is False and cfg.patch.edge == "pad_black"
    cfg, _ = parse_config(["a.svs", "output.store_pixels=false", "patch.edge=pad_white"])
    assert cfg.output.store_pixels is False and cfg.patch.edge == "pad_white"
    assert parse_config(["a.svs"])[0].output.store_pixels is True and parse_config(["a.svs"])[0].patch.edge == "skip"
    assert main(["a.svs", "patch.edge=pad"]) == 2 and "patch.edge" in capsys.readouterr().err

    out = tmp_path / "coords"
    assert main([str(demo_slide), "--out", str(out), "-q", "--no-pixels", "--no-qc"]) == 0
    row = pd.read_csv(out / "manifest.csv").iloc[0]
    with PatchFile(out / "patches" / "CMU-1-Small-Region.h5") as pf:
        assert row["status"] == "done" and not pf.has_pixels and len(pf) == row["n_patches"] > 30
        assert row["params_hash"] == pf.attrs["params_hash"]
    assert main([str(demo_slide), "--out", str(out), "-q", "--no-pixels", "--no-qc"]) == 0  # resumes: skipped
    assert pd.read_csv(out / "manifest.csv").iloc[0]["status"] == "skipped"
    assert main([str(demo_slide), "--out", str(out), "-q", "--no-qc"]) == 0  # pixels wanted now: redone
    row = pd.read_csv(out / "manifest.csv").iloc[0]
    with PatchFile(out / "patches" / "CMU-1-Small-Region.h5") as pf:
        assert row["status"] == "done" and pf.has_pixels and pf.codec == "jpeg"
