"""GeoJSON both ways: tissue outlines out (valid, with holes, level-0, QuPath annotations), ROIs in
(QuPath's export forms, include/exclude, rasterised on the tissue mask), and real tiling inside an ROI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

shapely = pytest.importorskip("shapely", reason="shapely is a test dependency: pip install -e '.[dev]'")
from shapely.geometry import Polygon as ShapelyPolygon, box, shape  # noqa: E402
from shapely.ops import unary_union  # noqa: E402

from conftest import shared_path  # noqa: E402
from preprocessing.config import TileConfig  # noqa: E402
from preprocessing.geojson import (  # noqa: E402
    RoiError, find_roi_file, load_roi, parse_roi, rasterize, roi_mask, tissue_feature_collection, tissue_polygons,
    well_composed,
)
from preprocessing.h5format import PatchFile  # noqa: E402
from preprocessing.qc import ROI_COLOUR, ROI_EXCLUDE_COLOUR  # noqa: E402
from preprocessing.readers import open_slide  # noqa: E402
from preprocessing.slide_tiler import SlideError, params_hash, slide_params_hash, slide_tissue, tile_slide  # noqa: E402


def rect(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(coords, cls=None, kind="Polygon"):
    props = {"objectType": "annotation"}
    if cls is not None:
        props["classification"] = cls
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coords}, "properties": props}


def shapely_polygons(collection: dict) -> list:
    return [shape(f["geometry"]) for f in collection["features"]]


def n_mask_holes(mask: np.ndarray) -> int:
    """Background components (4-connected) that do not touch the border."""
    bg = np.pad(~mask, 1, constant_values=True).astype(np.uint8)
    n, labels = cv2.connectedComponents(bg, connectivity=4)
    return n - 2 if mask.any() else 0  # minus the label 0 (tissue) and the outer background


# -- tissue mask -> polygons -------------------------------------------------------------------

def test_outlines_are_exact_valid_and_have_holes():
    m = np.zeros((40, 50), bool)
    m[5:35, 5:45] = True
    m[10:25, 10:30] = False          # a hole ...
    m[14:18, 15:20] = True           # ... with an island in it
    m[30, 40] = False                # a one-pixel hole
    m[35, 45] = True                 # touches the big piece only diagonally: joined, not a pinch point
    m[2:4, 47:49] = True             # a separate piece
    scale = (0.25, 0.125)            # mask px per level-0 px
    polys = tissue_polygons(m, scale)
    geoms = [ShapelyPolygon(p[0], p[1:]) for p in polys]
    assert len(geoms) == 3 and all(g.is_valid for g in geoms)
    assert shapely.MultiPolygon(geoms).is_valid  # the pieces do not touch each other either
    assert sorted(len(g.interiors) for g in geoms) == [0, 0, 2] == sorted([0, 0, n_mask_holes(m)])
    for g in geoms:  # RFC 7946: exterior counter-clockwise, holes clockwise (in x, y)
        assert g.exterior.is_ccw and not any(r.is_ccw for r in g.interiors)
    # pixel edges exactly: area = pixel count, in level-0 px (1 mask px = 4 × 8 level-0 px)
    assert sum(g.area for g in geoms) == pytest.approx(well_composed(m).sum() / (scale[0] * scale[1]))
    big = max(geoms, key=lambda g: g.area)
    assert big.bounds == (5 / 0.25, 5 / 0.125, 46 / 0.25, 36 / 0.125)  # incl. the diagonal pixel (45, 35)
    hole = max((ShapelyPolygon(r) for r in big.interiors), key=lambda g: g.area)
    assert hole.bounds == (10 / 0.25, 10 / 0.125, 30 / 0.25, 25 / 0.125)
    assert tissue_polygons(np.zeros((5, 5), bool), (1, 1)) == []


def test_random_masks_always_give_valid_exact_polygons():
    rng = np.random.default_rng(0)
    for _ in range(60):
        noise = cv2.GaussianBlur(rng.random((50, 70)), (0, 0), rng.uniform(0.5, 3))
        m = noise > np.quantile(noise, rng.uniform(0.2, 0.8))
        geoms = [ShapelyPolygon(p[0], p[1:]) for p in tissue_polygons(m, (1.0, 1.0))]
        assert shapely.MultiPolygon(geoms).is_valid
        assert sum(g.area for g in geoms) == pytest.approx(well_composed(m).sum())
        assert sum(len(g.interiors) for g in geoms) == n_mask_holes(well_composed(m))
        np.testing.assert_array_equal(rasterize(tissue_polygons(m, (0.5, 0.25)), m.shape, (0.5, 0.25)), well_composed(m))


def test_feature_collection_is_a_qupath_annotation_set():
    m = np.zeros((10, 10), bool)
    m[2:8, 2:8] = True
    m[4:6, 4:6] = False
    fc = json.loads(json.dumps(tissue_feature_collection(tissue_polygons(m, (1, 1)), "s1")))
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 1
    f = fc["features"][0]
    assert f["properties"]["objectType"] == "annotation"
    assert f["properties"]["classification"]["name"] == "Tissue" and len(f["properties"]["classification"]["color"]) == 3
    rings = f["geometry"]["coordinates"]
    assert f["geometry"]["type"] == "Polygon" and len(rings) == 2 and all(r[0] == r[-1] for r in rings)
    assert f["id"] == tissue_feature_collection(tissue_polygons(m, (1, 1)), "s1")["features"][0]["id"]  # deterministic


# -- GeoJSON -> ROI ------------------------------------------------------------------------------

def test_qupath_bare_array_with_string_and_dict_classes(tmp_path):
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps([  # QuPath's older "Export as GeoJSON": a bare array of features
        feature([rect(0, 0, 100, 100)], "Tumor"),
        feature([rect(10, 10, 20, 20)], "EXCLUDE"),                                # a plain string, any case
        feature([[rect(50, 50, 60, 60)], [rect(70, 70, 80, 80)]], {"name": "Exclude", "colorRGB": -65536},
                kind="MultiPolygon"),
        feature([1, 2], None, kind="Point"),
        {"type": "Feature", "geometry": None, "properties": {}},
    ]))
    roi = load_roi(path)
    assert len(roi.include) == 1 and len(roi.exclude) == 3 and len(roi.include[0][0]) == 4  # closing point dropped
    assert any("1 Point" in w for w in roi.warnings) and any("without a geometry" in w for w in roi.warnings)
    assert len(roi.sha256) == 64
    other = load_roi(path, exclude_class="tumor")
    assert len(other.include) == 3 and len(other.exclude) == 1


def test_single_feature_bare_geometry_and_collection():
    poly = {"type": "Polygon", "coordinates": [rect(0, 0, 5, 5), rect(1, 1, 2, 2)]}
    for data in (poly, {"type": "Feature", "geometry": poly, "properties": None},
                 {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": poly}]},
                 {"type": "GeometryCollection", "geometries": [poly, {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}]}):
        roi = parse_roi(data, Path("x.geojson"))
        assert len(roi.include) == 1 and len(roi.include[0]) == 2 and not roi.exclude


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"type": "FeatureCollection"}', "no `features` list"),
    ('{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}', "at least 3"),
    ('{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [["a", "b", "c"]]}}', "[x, y] positions"),
    ('{"type": "Feature", "geometry": {"type": "Circle", "coordinates": [0, 0]}}', "unknown geometry type"),
    ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [0, 0]}}]', "no Polygon or MultiPolygon"),
    ('42', "expected a GeoJSON object"),
])
def test_bad_geojson_names_the_file(tmp_path, text, message):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(RoiError) as err:
        load_roi(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_roi_file_or_folder_per_slide(tmp_path):
    (tmp_path / "a.geojson").write_text("{}")
    (tmp_path / "b.json").write_text("{}")
    (tmp_path / "c.svs.geojson").write_text("{}")
    assert find_roi_file(None, "a") == (None, None)
    assert find_roi_file(tmp_path / "a.geojson", "anything") == (tmp_path / "a.geojson", None)
    assert find_roi_file(tmp_path, "a") == (tmp_path / "a.geojson", None)
    assert find_roi_file(str(tmp_path), "b") == (tmp_path / "b.json", None)
    assert find_roi_file(tmp_path, "c", "/slides/c.svs") == (tmp_path / "c.svs.geojson", None)
    none, warning = find_roi_file(tmp_path, "d")
    assert none is None and "d.geojson" in warning and str(tmp_path) in warning
    with pytest.raises(RoiError, match="nope.geojson does not exist"):
        find_roi_file(tmp_path / "nope.geojson", "a")


def test_rasterize_holes_overlaps_and_exclusions():
    scale = (0.1, 0.1)  # 10 level-0 px per mask px; pixel i is inside when its centre 10 i + 5 is
    frame = [np.array(rect(0, 0, 200, 200)[:-1], float), np.array(rect(50, 50, 150, 150)[:-1], float)]
    got = rasterize([frame], (30, 30), scale)
    want = np.zeros((30, 30), bool)
    want[:20, :20] = True
    want[5:15, 5:15] = False
    np.testing.assert_array_equal(got, want)
    a, b = (np.array(rect(*r)[:-1], float) for r in ((0, 0, 100, 100), (50, 50, 150, 150)))
    assert rasterize([[a], [b]], (30, 30), scale)[5:10, 5:10].all()  # overlapping annotations add up, not XOR
    roi = parse_roi([feature([rect(0, 0, 200, 200)]), feature([rect(0, 0, 100, 100)], "exclude")],
                    Path("r.geojson"))
    inside = roi_mask(roi, (30, 30), scale)
    assert inside.sum() == 400 - 100 and not inside[:10, :10].any()
    only_exclude = parse_roi([feature([rect(0, 0, 100, 100)], "exclude")], Path("r.geojson"))
    assert roi_mask(only_exclude, (30, 30), scale).sum() == 900 - 100  # exclusions only: the rest of the slide


# -- real slide ---------------------------------------------------------------------------------

# CMU-1-Small-Region, 2220 × 2967 px: a frame with a big hole (open to the background on its left) and a
# small hole in solid tissue, plus an "exclude" rectangle at the bottom left.
ROI_FRAME = (200, 300, 2000, 2700)
ROI_HOLES = ((700, 900, 1500, 1700), (1100, 2150, 1350, 2400))
ROI_EXCLUDE = (200, 2100, 1000, 2700)


def roi_collection() -> dict:
    return {"type": "FeatureCollection", "features": [
        feature([rect(*ROI_FRAME), *(rect(*h) for h in ROI_HOLES)], {"name": "Tumor", "color": [200, 0, 0]}),
        feature([[rect(*ROI_EXCLUDE)]], {"name": "Exclude"}, kind="MultiPolygon"),
    ]}


def roi_region():
    frame = ShapelyPolygon(rect(*ROI_FRAME), [rect(*h) for h in ROI_HOLES])
    return frame.difference(box(*ROI_EXCLUDE))


def cfg_for(roi=None) -> TileConfig:
    cfg = TileConfig()
    cfg.output.codec = "raw"
    cfg.roi = None if roi is None else str(roi)
    return cfg


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """CMU tiled once without and once with the ROI (with QC and tissue GeoJSON)."""
    slide = shared_path("wsi", "cmu-1-small-region.svs")
    out = tmp_path_factory.mktemp("roi")
    roi_file = out / "cmu.geojson"
    roi_file.write_text(json.dumps(roi_collection()))
    runs = {}
    for name, cfg in (("full", cfg_for()), ("roi", cfg_for(roi_file))):
        res = tile_slide(slide, out / f"{name}.h5", cfg, slide_id="cmu", qc_png=out / f"{name}.png",
                         geojson_path=out / f"{name}.geojson")
        with PatchFile(out / f"{name}.h5") as pf:
            runs[name] = dict(res=res, coords=pf.coords(), frac=pf.tissue_fraction(), attrs=dict(pf.attrs),
                              geojson=json.loads((out / f"{name}.geojson").read_text()), cfg=cfg)
    runs.update(slide=slide, roi_file=roi_file)
    return runs


def test_patches_only_inside_roi_minus_holes_and_exclusions(tiled):
    full, roi = tiled["full"], tiled["roi"]
    size = float(roi["attrs"]["patch_size_level0"])
    region = roi_region()
    cut = unary_union([box(*h) for h in ROI_HOLES] + [box(*ROI_EXCLUDE)])
    tol = 0.1  # the ROI is rasterised at the tissue mask's 8 µm/px: one mask px = 16 level-0 px of a 224 px patch
    assert 10 <= len(roi["coords"]) < len(full["coords"])
    for (x, y), frac in zip(roi["coords"], roi["frac"]):
        cell = box(x, y, x + size, y + size)
        inside = cell.intersection(region).area / cell.area
        assert frac >= 0.5 and inside >= frac - tol, (x, y, inside, frac)  # tissue counted only inside the ROI
        assert cell.intersection(cut).area / cell.area <= 0.5 + tol, (x, y)
    full_set = {tuple(c) for c in full["coords"]}
    roi_set = {tuple(c) for c in roi["coords"]}
    assert roi_set <= full_set  # the ROI only removes patches
    well_inside = {c for c in full_set if region.contains(box(c[0], c[1], c[0] + size, c[1] + size).buffer(20))}
    assert len(well_inside) >= 5 and well_inside <= roi_set  # patches wholly in the ROI are all kept
    a = roi["attrs"]
    assert a["roi_path"] == str(tiled["roi_file"].resolve()) and len(a["roi_sha256"]) == 64
    assert a["roi_exclude_class"] == "exclude" and full["attrs"]["roi_path"] == ""
    assert a["params_hash"] == roi["res"].params_hash != full["res"].params_hash


def test_tissue_geojson_round_trips(tiled):
    w, h = tiled["full"]["attrs"]["level0_width"], tiled["full"]["attrs"]["level0_height"]
    mpp = float(tiled["full"]["attrs"]["mpp"])
    for name in ("full", "roi"):
        run = tiled[name]
        geoms = shapely_polygons(run["geojson"])
        union = shapely.MultiPolygon(geoms)
        assert geoms and union.is_valid and all(g.geom_type == "Polygon" and g.is_valid for g in geoms)
        area_mm2 = union.area * mpp ** 2 / 1e6
        assert area_mm2 == pytest.approx(run["attrs"]["tissue_area_mm2"], rel=0.03)
        x0, y0, x1, y1 = union.bounds  # level-0 px: within the slide and spanning most of it, not mask px
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        # the same mask as the tiler's (recomputed): one GeoJSON hole per mask hole
        roi = load_roi(run["cfg"].roi) if run["cfg"].roi else None
        with open_slide(tiled["slide"]) as reader:
            tissue = slide_tissue(reader, tiled["slide"], mpp, run["cfg"], roi, [])
        assert sum(len(g.interiors) for g in geoms) == n_mask_holes(well_composed(tissue.mask))
    full = shapely.MultiPolygon(shapely_polygons(tiled["full"]["geojson"]))
    assert full.bounds[3] > 0.9 * h and full.bounds[2] - full.bounds[0] > 0.4 * w  # the tissue reaches the bottom edge
    inside = shapely.MultiPolygon(shapely_polygons(tiled["roi"]["geojson"]))
    assert box(*ROI_FRAME).buffer(17).contains(inside)  # within the ROI (+1 mask px)
    assert inside.intersection(box(*ROI_EXCLUDE)).area < 0.05 * box(*ROI_EXCLUDE).area
    # the small ROI hole lies in solid tissue: it is a hole of the written tissue polygon, at its place
    small = box(*ROI_HOLES[1])
    holes = [ShapelyPolygon(r) for g in inside.geoms for r in g.interiors]
    best = max(holes, key=lambda p: p.intersection(small).area)
    assert best.symmetric_difference(small).area < 0.2 * small.area


def test_qc_draws_roi_outlines(tiled):
    qc = cv2.imread(str(tiled["roi"]["res"].qc_png))[..., ::-1]
    assert (qc == ROI_COLOUR).all(axis=-1).sum() > 200 and (qc == ROI_EXCLUDE_COLOUR).all(axis=-1).sum() > 100
    plain = cv2.imread(str(tiled["full"]["res"].qc_png))[..., ::-1]
    assert (plain == ROI_COLOUR).all(axis=-1).sum() == 0


def test_roi_content_and_exclude_class_change_the_hash(tiled, tmp_path):
    slide, cfg = tiled["slide"], tiled["roi"]["cfg"]
    base = slide_params_hash(slide, cfg, slide_id="cmu")
    assert base == tiled["roi"]["res"].params_hash
    assert params_hash(cfg_for(), "openslide", 0.499) == params_hash(cfg_for("/elsewhere.geojson"), "openslide", 0.499)
    edited = tmp_path / "cmu.geojson"
    collection = roi_collection()
    collection["features"][1]["properties"]["classification"]["name"] = "Stroma"
    edited.write_text(json.dumps(collection))
    assert slide_params_hash(slide, cfg_for(edited), slide_id="cmu") != base  # an edited annotation redoes the slide
    other_class = cfg_for(tiled["roi_file"])
    other_class.roi_exclude_class = "Stroma"
    assert slide_params_hash(slide, other_class, slide_id="cmu") != base
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "cmu.geojson").write_bytes(tiled["roi_file"].read_bytes())
    assert slide_params_hash(slide, cfg_for(moved), slide_id="cmu") == base  # the content counts, not the path


def test_missing_or_bad_roi_is_a_slide_error(tmp_path):
    slide = shared_path("wsi", "cmu-1-small-region.svs")
    with pytest.raises(SlideError, match="nope.geojson does not exist"):
        tile_slide(slide, tmp_path / "x.h5", cfg_for(tmp_path / "nope.geojson"))
    bad = tmp_path / "bad.geojson"
    bad.write_text("[]")
    with pytest.raises(SlideError, match="bad.geojson has no Polygon"):
        tile_slide(slide, tmp_path / "x.h5", cfg_for(bad))
    assert not (tmp_path / "x.h5").exists()
    far = tmp_path / "far.geojson"  # e.g. exported in µm or from another image: no tissue, a warning
    far.write_text(json.dumps(feature([rect(1e6, 1e6, 2e6, 2e6)])))
    res = tile_slide(slide, tmp_path / "far.h5", cfg_for(far))
    assert res.n_patches == 0 and any("covers none of the slide" in w for w in res.warnings)
