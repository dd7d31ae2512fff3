"""`sgcl heatmap` on the real demo slide: scores that are a known function of position come out as the
right colour gradient at the right size, with a colour bar; the scores h5 round-trips; the top-k GeoJSON
boxes are the k best patches' footprints; the gallery has its grid; --model goes through
evaluation.mil.scores (a test double here); bad inputs are exit 2 with a message naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest

from conftest import shared_path
from evaluation.extract import write_features_h5
from evaluation.heatmap import (COLORBAR_HEIGHT, HeatmapError, gallery_shape, normalize_scores, score_map,
                                top_indices)
from evaluation.heatmap_cli import main

SID = "cmu-1-small-region"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The real demo slide tiled at 128 px (stored pixels) and a synthetic feature file with its real coords."""
    slide = shared_path("wsi", f"{SID}.svs")
    root = tmp_path_factory.mktemp("heat")
    from preprocessing.tile import main as tile_main

    assert tile_main([str(slide), "--out", str(root / "tiles"), "--patch-size", "128", "--workers", "0"]) == 0
    patch_file = root / "tiles" / "patches" / f"{SID}.h5"
    with h5py.File(patch_file, "r") as f:
        coords, cattrs, grid = f["coords"][:], dict(f["coords"].attrs), f["grid"][:]
    feats = np.random.default_rng(0).normal(size=(len(coords), 16)).astype(np.float32)
    fdir = root / "features" / "h5_files"
    write_features_h5(fdir / f"{SID}.h5", feats, coords, grid, cattrs, {"slide_id": SID, "source": str(patch_file)})
    return {"slide": slide, "root": root, "features": root / "features", "coords": coords, "size0": float(cattrs["patch_size_level0"])}


def _csv(path: Path, coords: np.ndarray, values: np.ndarray) -> Path:
    pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "score": values}).to_csv(path, index=False)
    return path


def _hsv(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float64)


def test_gradient_size_colourbar_roundtrip_topk_and_gallery(demo, tmp_path):
    pytest.importorskip("shapely")
    from shapely.geometry import box, shape

    coords = demo["coords"]
    scores = _csv(tmp_path / "s.csv", coords[::-1], coords[::-1, 0].astype(float))  # score = x, rows shuffled
    out = tmp_path / "out"
    argv = ["--slides", str(demo["slide"]), "--features", str(demo["features"]), "--scores", str(scores),
            "--out", str(out), "--mpp", "4", "--normalize", "minmax", "--cmap", "coolwarm", "--alpha", "0.9",
            "--topk", "5", "--gallery", "4", "progress=false"]
    assert main(argv) == 0
    # size: 4 µm/px of a 0.499 µm/px slide
    from preprocessing.mpp import resolve_mpp
    from preprocessing.readers import open_slide

    with open_slide(demo["slide"]) as r:
        ds = 4.0 / resolve_mpp(demo["slide"], r.properties).value
        w0, h0 = r.dimensions
    pic = cv2.imread(str(out / f"{SID}_heatmap.png"))[..., ::-1]
    w, h = round(w0 / ds), round(h0 / ds)
    assert pic.shape == (h + COLORBAR_HEIGHT, w, 3)
    # colour follows x: coolwarm is blue (low) to red (high) over the covered pixels
    values = score_map(coords, normalize_scores(coords[:, 0], "minmax"), demo["size0"], ds, (h, w))
    covered = np.isfinite(values)
    mid = np.median(coords[:, 0] + demo["size0"] / 2) / ds
    left, right = covered.copy(), covered.copy()
    left[:, int(mid):] = False
    right[:, : int(mid)] = False
    rgb = pic[:h].astype(np.float64)
    assert (rgb[..., 0] - rgb[..., 2])[right].mean() > (rgb[..., 0] - rgb[..., 2])[left].mean() + 40
    # the colour bar: blue on its left end, red on its right end, white around
    bar = pic[h:]
    assert bar.shape[0] == COLORBAR_HEIGHT
    row = bar[12]
    coloured = np.flatnonzero(_hsv(row[None])[0, :, 1] > 80)
    assert coloured.size > w / 2
    assert row[coloured[0], 2] > row[coloured[0], 0] and row[coloured[-1], 0] > row[coloured[-1], 2]
    # scores h5 round-trips, and is itself a valid --scores input
    with h5py.File(out / f"{SID}_scores.h5", "r") as f:
        np.testing.assert_array_equal(f["coords"][:], coords)
        np.testing.assert_allclose(f["scores/score"][:], coords[:, 0])
        assert f.attrs["drawn_score"] == "score" and f.attrs["normalize"] == "minmax"
        assert abs(f.attrs["picture_downsample"] - ds) < 1e-9
    assert main(argv[:4] + ["--scores", str(out / f"{SID}_scores.h5"), "--out", str(tmp_path / "again"),
                            "--gallery", "0", "--topk", "0", "progress=false"]) == 0
    # top-k: 5 boxes at the 5 highest-scoring coords, each the patch footprint, score in measurements
    gj = json.loads((out / f"{SID}_topk.geojson").read_text())
    assert len(gj["features"]) == 5
    best = top_indices(coords[:, 0].astype(float), 5)
    for feat, i in zip(gj["features"], best):
        x, y = coords[i]
        geom = shape(feat["geometry"])
        assert geom.is_valid and geom.symmetric_difference(box(x, y, x + demo["size0"], y + demo["size0"])).area < 1e-6
        m = feat["properties"]["measurements"]
        assert m["score"] == pytest.approx(x) and m["patch_index"] == i
        assert feat["properties"]["objectType"] == "annotation"
    assert sorted(f["properties"]["measurements"]["score"] for f in gj["features"]) == sorted(coords[best, 0].tolist())
    # gallery: 2 rows (top, bottom) of 4 patches of 128 px, from the stored pixels
    gal = cv2.imread(str(out / f"{SID}_gallery.png"))
    assert gal.shape[:2] == gallery_shape(4, 128)
    from preprocessing.h5format import PatchFile

    with PatchFile(demo["root"] / "tiles" / "patches" / f"{SID}.h5") as pf:
        first = pf.read(int(best[0]))
    assert np.abs(gal[:128, :128, ::-1].astype(int) - cv2.resize(first, (128, 128)).astype(int)).mean() < 2
    manifest = pd.read_csv(out / "manifest.csv")
    assert manifest["slide_id"].tolist() == [SID] and manifest["n_patches"].tolist() == [len(coords)]


def test_model_path_refine_threshold_and_default_size(demo, tmp_path):
    """A real ABMIL model (``sgcl eval mil`` on bags with planted instances) drawn on the demo slide: its
    attention must pick the patches of the slide that carry the planted feature, in the lower half."""
    from evaluation.mil.cli import main as mil_main
    from test_mil import D, FAST, planted_cohort

    coords = demo["coords"]
    feats_dir, labels, _ = planted_cohort(tmp_path / "cohort")
    model = tmp_path / "mil"
    assert mil_main(["--features", str(feats_dir), "--labels", str(labels), "--out", str(model), *FAST,
                     "--model", "abmil", "cv.folds=3"]) == 0
    # the demo slide's features: background N(0, I) everywhere, the planted cluster on 3 patches low on the slide
    rng = np.random.default_rng(1)
    x = rng.normal(size=(len(coords), D)).astype(np.float32)
    planted = np.argsort(coords[:, 1])[-3:]
    centre = np.zeros(D, np.float32)
    centre[:4] = 3.0
    x[planted] = centre + 0.5 * rng.normal(size=(3, D))
    with h5py.File(demo["features"] / "h5_files" / f"{SID}.h5", "r") as f:
        cattrs, grid = dict(f["coords"].attrs), f["grid"][:]
    fdir = tmp_path / "features" / "h5_files"
    write_features_h5(fdir / f"{SID}.h5", x, coords, grid, cattrs, {"slide_id": SID})
    out = tmp_path / "out"
    assert main(["--slides", str(demo["slide"].parent), "--features", str(fdir), "--model", str(model),
                 "--fold", "1", "--out", str(out), "--refine", "--threshold", "0.5", "--topk", "3",
                 "--gallery", "0", "progress=false"]) == 0
    from evaluation.mil.scores import patch_scores

    expected = patch_scores(model, x, fold=1)
    with h5py.File(out / f"{SID}_scores.h5", "r") as f:
        assert "attention" in f["scores"] and "logits_tumour" in f["scores"] and f.attrs["drawn_score"] == "attention"
        assert f.attrs["refine"] and f.attrs["fold"] == 1
        np.testing.assert_allclose(f["scores/attention"][:], expected["attention"], rtol=1e-5)
    top = json.loads((out / f"{SID}_topk.geojson").read_text())["features"]
    assert len(top) == 3 and int(top[0]["properties"]["measurements"]["patch_index"]) in set(planted.tolist())
    # default picture size (longer side 2048) with the colour bar; threshold 0.5 on percentiles: about half
    # the patches are coloured, the planted (top-attention) ones among them
    pic = cv2.imread(str(out / f"{SID}_heatmap.png"))[..., ::-1]
    from preprocessing.readers import open_slide

    with open_slide(demo["slide"]) as r:
        w0, h0 = r.dimensions
        ds = max(1.0, max(w0, h0) / 2048)
        thumb = r.read_scaled(ds)
    h = thumb.shape[0]
    assert pic.shape == (h + COLORBAR_HEIGHT, thumb.shape[1], 3) and max(thumb.shape[:2]) == 2048
    changed = np.abs(pic[:h].astype(int) - thumb.astype(int)).sum(2) > 30
    half = int(demo["size0"] / ds / 2)
    for i in planted:
        cx, cy = (int(v / ds) + half for v in coords[i])
        assert changed[cy - 3:cy + 4, cx - 3:cx + 4].mean() > 0.9


def test_refine_interpolates_between_patches():
    coords = np.array([[0, 0], [100, 0]])
    plain = score_map(coords, np.array([0.0, 1.0]), 100, 10, (10, 20))
    refined = score_map(coords, np.array([0.0, 1.0]), 100, 10, (10, 20), refine=True)
    assert set(np.unique(plain[0])) == {0.0, 1.0}
    assert np.all(np.diff(refined[5]) >= -1e-12) and 0 < refined[5, 9] < 1 and 0 < refined[5, 10] < 1
    assert refined[5, 9] < refined[5, 10]
    np.testing.assert_allclose(normalize_scores([3, 1, 2, 2], "percentile"), [1.0, 0.0, 0.5, 0.5])


def test_bad_inputs_exit_2(demo, tmp_path, capsys):
    coords = demo["coords"]
    good = _csv(tmp_path / "s.csv", coords, coords[:, 0].astype(float))
    base = ["--features", str(demo["features"]), "--out", str(tmp_path / "o"), "progress=false"]
    # missing slide
    other = tmp_path / "slides"
    other.mkdir()
    (other / "other.svs").write_bytes(demo["slide"].read_bytes())
    assert main(base + ["--slides", str(other), "--scores", str(good)]) == 2
    assert f"no slide {SID!r}" in capsys.readouterr().err
    # features without coords
    bad = tmp_path / "nocoords"
    bad.mkdir()
    with h5py.File(bad / f"{SID}.h5", "w") as f:
        f["features"] = np.zeros((3, 4), np.float32)
    assert main(["--features", str(bad), "--slides", str(demo["slide"]), "--scores", str(good),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no `coords` dataset" in capsys.readouterr().err
    # scores of the wrong length (h5 without coords, by order)
    short = tmp_path / "short.h5"
    with h5py.File(short, "w") as f:
        f["scores"] = np.zeros(len(coords) - 1, np.float32)
    # (a per-slide failure: recorded in the manifest, the other slides go on, exit 1)
    assert main(base + ["--slides", str(demo["slide"]), "--scores", str(short)]) == 1
    err = capsys.readouterr().err
    assert f"has {len(coords)} patches" in err and "short.h5" in err
    manifest = pd.read_csv(tmp_path / "o" / "manifest.csv")
    assert manifest["status"].tolist() == ["failed"] and "short.h5" in manifest["error"][0]
    # a CSV missing some patches
    _csv(tmp_path / "part.csv", coords[1:], coords[1:, 0].astype(float))
    assert main(base + ["--slides", str(demo["slide"]), "--scores", str(tmp_path / "part.csv")]) == 1
    assert "1 of the" in capsys.readouterr().err
    # --model that is not a folder
    assert main(base + ["--slides", str(demo["slide"]), "--model", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    # neither source; a bad colour map
    assert main(base + ["--slides", str(demo["slide"])]) == 2
    assert "exactly one score source" in capsys.readouterr().err
    assert main(base + ["--slides", str(demo["slide"]), "--scores", str(good), "--cmap", "nope"]) == 2
    assert "unknown colour map" in capsys.readouterr().err
    with pytest.raises(HeatmapError):
        normalize_scores([1.0], "zscore")
