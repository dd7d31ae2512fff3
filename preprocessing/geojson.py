"""GeoJSON both ways: tissue contours out (QuPath annotations), regions of interest in.

Out: :func:`tissue_polygons` traces the tissue mask's pixel-edge outlines (exteriors and holes) and
:func:`write_tissue_geojson` writes them in level-0 pixel coordinates as a FeatureCollection of
``Tissue`` annotations that QuPath imports (File → Import objects, or drag the file onto the viewer).

In: :func:`load_roi` reads what QuPath's "Export as GeoJSON" writes (a FeatureCollection, a bare
list of Features, one Feature or one geometry) into include / exclude polygons; :func:`roi_mask`
rasterises them on the tissue mask's grid (a pixel is in when its centre is). Features whose classification name equals the exclude
class (case-insensitive) are cut out of the rest.

A polygon here is a list of rings, ``(n, 2)`` float arrays of level-0 ``(x, y)``, the exterior
first; rings are stored closed in GeoJSON and open in memory.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

from sgcl.utils.atomic import atomic_write_text

from .qc import TISSUE_COLOUR

Polygon = list[np.ndarray]
TISSUE_CLASS = "Tissue"
ROI_SUFFIXES = (".geojson", ".json")
_POLYGONAL = ("Polygon", "MultiPolygon")
_IGNORED = ("Point", "MultiPoint", "LineString", "MultiLineString")


class RoiError(ValueError):
    """An ROI path or GeoJSON file that cannot be used; the message names the file and the fix."""


# -- tissue mask -> polygons -> GeoJSON ------------------------------------------------------
def well_composed(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every 2×2 block that touches only diagonally (``[[1, 0], [0, 1]]`` and its mirror)
    filled at one corner, repeated until none is left: the pixel-edge outlines of the result are
    simple rings that never touch, i.e. valid polygons. Joins what 8-connectivity already joins."""
    m = np.ascontiguousarray(mask, dtype=bool).copy()
    while True:
        a, b, c, d = m[:-1, :-1], m[:-1, 1:], m[1:, :-1], m[1:, 1:]
        main_diag = a & d & ~b & ~c          # fill the top-right pixel
        anti_diag = b & c & ~a & ~d          # fill the top-left pixel
        if not (main_diag.any() or anti_diag.any()):
            return m
        m[:-1, 1:] |= main_diag
        m[:-1, :-1] |= anti_diag


def tissue_polygons(mask: np.ndarray, scale: tuple[float, float]) -> list[Polygon]:
    """Outlines of ``mask`` (bool, mask px = level-0 px · ``scale``) as level-0 polygons with holes.

    The outlines follow pixel edges exactly (mask pixel ``i`` covers level-0 ``[i / s, (i + 1) / s)``),
    so a polygon's area is its pixel count (of :func:`well_composed` ``mask``). They are traced with
    ``cv2.findContours`` (``RETR_CCOMP``: outer boundaries and their holes) on a lattice of twice the
    resolution where pixel centres, edges and corners each have a cell: the trace of that lattice's
    cells is the mask's pixel-edge outline, once the corners the tracer cuts diagonally are put back.
    Exteriors are counter-clockwise and holes clockwise in (x, y) (RFC 7946; on screen, with y down,
    the reverse).
    """
    m = well_composed(mask)
    if not m.any():
        return []
    h, w = m.shape
    lattice = np.zeros((2 * h + 3, 2 * w + 3), np.uint8)   # +1 cell of zero border on each side
    core = lattice[1:-1, 1:-1]                               # core[q] <-> mask coordinate q / 2
    u = m.astype(np.uint8)
    for dy in (0, 1, 2):                                     # a pixel sets its centre, edges, corners
        for dx in (0, 1, 2):
            core[dy:dy + 2 * h:2, dx:dx + 2 * w:2] |= u
    contours, hierarchy = cv2.findContours(lattice, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return []
    to_level0 = np.array([0.5 / scale[0], 0.5 / scale[1]])

    def ring(i: int, exterior: bool) -> np.ndarray:
        pts = (_crack_ring(contours[i].reshape(-1, 2), lattice) - 1.0) * to_level0
        return pts if (_signed_area(pts) > 0) == exterior else pts[::-1]

    polygons = []
    for i, (_, _, child, parent) in enumerate(hierarchy[0]):
        if parent != -1:
            continue
        rings = [ring(i, True)]
        while child != -1:
            rings.append(ring(child, False))
            child = hierarchy[0][child][0]
        polygons.append(rings)
    return polygons


def _crack_ring(pts: np.ndarray, lattice: np.ndarray) -> np.ndarray:
    """A closed 8-connected trace of lattice cells -> the 4-connected outline through them: each
    diagonal step gets its foreground elbow cell back, then only the turning points are kept."""
    pts = pts.astype(np.int64)
    step = np.roll(pts, -1, axis=0) - pts
    diag = np.nonzero((step[:, 0] != 0) & (step[:, 1] != 0))[0]
    if len(diag):
        a = pts[diag] + step[diag] * (1, 0)                 # elbow after a horizontal move
        b = pts[diag] + step[diag] * (0, 1)                 # elbow after a vertical move
        elbow = np.where((lattice[a[:, 1], a[:, 0]] > 0)[:, None], a, b)
        pts = np.insert(pts, diag + 1, elbow, axis=0)
    before = pts - np.roll(pts, 1, axis=0)
    after = np.roll(pts, -1, axis=0) - pts
    return pts[(before != after).any(axis=1)].astype(np.float64)


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def polygon_area(polygon: Polygon) -> float:
    """Area of a polygon (exterior minus holes), in squared coordinate units."""
    return abs(_signed_area(polygon[0])) - sum(abs(_signed_area(r)) for r in polygon[1:])


def _closed(ring: np.ndarray, decimals: int) -> list[list[float]]:
    pts = np.round(ring, decimals).tolist()
    return pts + [pts[0]]


def stable_id(*parts: object) -> str:
    """A UUID derived from ``parts`` (the same on every run; QuPath reads a Feature's ``id`` as its object UUID)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join(str(p) for p in parts)))


def polygon_geometry(polygon: Polygon, decimals: int = 2) -> dict:
    """A GeoJSON Polygon geometry of ``polygon`` (open rings in memory, closed in GeoJSON)."""
    return {"type": "Polygon", "coordinates": [_closed(np.asarray(r, np.float64), decimals) for r in polygon]}


def annotation(geometry: dict, feature_id: str, class_name: str, colour: tuple[int, int, int],
               extra: dict | None = None) -> dict:
    """A QuPath annotation Feature: ``geometry`` classified ``class_name`` (``colour`` RGB), plus ``extra``
    properties (``name``, ``measurements`` — QuPath shows a ``{name: number}`` dict as measurements)."""
    props = {"objectType": "annotation", "classification": {"name": class_name, "color": list(colour)}}
    return {"type": "Feature", "id": feature_id, "geometry": geometry, "properties": {**props, **(extra or {})}}


def tissue_feature_collection(polygons: list[Polygon], slide_id: str, decimals: int = 2) -> dict:
    """A GeoJSON FeatureCollection of one ``Tissue`` annotation (a Polygon) per tissue piece, with
    deterministic UUIDs (QuPath reads ``id`` as an object UUID)."""
    features = [annotation(polygon_geometry(poly, decimals), stable_id("sgcl-tissue", slide_id, k), TISSUE_CLASS,
                           TISSUE_COLOUR) for k, poly in enumerate(polygons)]
    return {"type": "FeatureCollection", "features": features}


def write_tissue_geojson(path: str | Path, mask: np.ndarray, scale: tuple[float, float], slide_id: str) -> Path:
    """Write the tissue outlines of ``mask`` to ``path`` (atomically) as QuPath annotations; returns ``path``."""
    path = Path(path)
    collection = tissue_feature_collection(tissue_polygons(mask, scale), slide_id)
    atomic_write_text(path, json.dumps(collection, separators=(",", ":")) + "\n")
    return path


# -- GeoJSON -> regions of interest -------------------------------------------------------------
@dataclass
class Roi:
    source: Path                                           # the GeoJSON file
    sha256: str                                            # of its bytes (part of the params hash)
    include: list[Polygon] = field(default_factory=list)   # empty = the whole slide
    exclude: list[Polygon] = field(default_factory=list)   # cut out of the include region
    warnings: list[str] = field(default_factory=list)


def find_roi_file(roi: str | Path | None, slide_id: str, slide_path: str | Path | None = None) -> tuple[Path | None, str | None]:
    """The ROI file for one slide: ``roi`` itself when it is a file; in a folder ``<slide_id>.geojson``,
    ``<slide_id>.json`` (or the slide's file name + one of those suffixes). Returns ``(file, warning)``;
    a folder without the slide's file gives ``(None, warning)``. A path that does not exist is an error."""
    if roi is None or str(roi) == "":
        return None, None
    root = Path(roi).expanduser()
    if root.is_file():
        return root, None
    if not root.is_dir():
        raise RoiError(f"ROI {root} does not exist; set `roi` (--roi) to a GeoJSON file or to a folder of "
                       "<slide_id>.geojson files (QuPath: File > Export objects as GeoJSON)")
    names = [slide_id + s for s in ROI_SUFFIXES]
    if slide_path is not None:
        names += [Path(slide_path).name + s for s in ROI_SUFFIXES]
    for name in names:
        if (root / name).is_file():
            return root / name, None
    return None, f"ROI folder {root} has no {slide_id}.geojson or {slide_id}.json: the whole slide is tiled"


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def class_name(properties: Any) -> str | None:
    """``properties.classification`` as QuPath writes it: ``{"name": ...}`` (0.2+) or a plain string."""
    if not isinstance(properties, dict):
        return None
    cls = properties.get("classification")
    if isinstance(cls, dict):
        cls = cls.get("name")
    return str(cls) if cls is not None else None


def _features(data: Any, where: str) -> Iterator[tuple[str, dict | None, dict]]:
    """``(label, geometry, properties)`` of every feature in any accepted top-level form."""
    if isinstance(data, list):                               # QuPath's older export: a bare array
        for i, item in enumerate(data):
            yield from _features(item, f"{where}[{i}]")
        return
    if not isinstance(data, dict) or "type" not in data:
        raise RoiError(f"expected a GeoJSON object with a `type` at {where}, got {type(data).__name__}")
    kind = data["type"]
    if kind == "FeatureCollection":
        feats = data.get("features")
        if not isinstance(feats, list):
            raise RoiError(f"FeatureCollection at {where} has no `features` list")
        for i, item in enumerate(feats):
            yield from _features(item, f"{where}.features[{i}]")
    elif kind == "Feature":
        props = data.get("properties") or {}
        yield where, data.get("geometry"), props if isinstance(props, dict) else {}
    else:                                                    # a bare geometry
        yield where, data, {}


def _ring(coords: Any, where: str) -> np.ndarray:
    try:
        pts = np.asarray([[float(p[0]), float(p[1])] for p in coords], np.float64)
    except (TypeError, ValueError, IndexError, KeyError):
        raise RoiError(f"{where}: a ring must be a list of [x, y] positions") from None
    if len(pts) > 1 and np.array_equal(pts[0], pts[-1]):
        pts = pts[:-1]
    if len(pts) < 3 or not np.isfinite(pts).all():
        raise RoiError(f"{where}: a ring needs at least 3 distinct finite [x, y] positions")
    return pts


def _polygon(coords: Any, where: str) -> Polygon:
    if not isinstance(coords, list) or not coords:
        raise RoiError(f"{where}: Polygon coordinates must be a non-empty list of rings")
    return [_ring(r, f"{where} ring {i}") for i, r in enumerate(coords)]


def _geometry_polygons(geom: dict, where: str, skipped: dict[str, int]) -> list[Polygon]:
    kind = geom.get("type")
    if kind == "GeometryCollection":
        out = []
        for i, g in enumerate(geom.get("geometries") or []):
            if isinstance(g, dict):
                out += _geometry_polygons(g, f"{where}.geometries[{i}]", skipped)
        return out
    if kind in _IGNORED:
        skipped[kind] = skipped.get(kind, 0) + 1
        return []
    if kind not in _POLYGONAL:
        raise RoiError(f"{where}: unknown geometry type {kind!r} (expected Polygon or MultiPolygon)")
    coords = geom.get("coordinates")
    if kind == "Polygon":
        return [_polygon(coords, where)]
    if not isinstance(coords, list):
        raise RoiError(f"{where}: MultiPolygon coordinates must be a list of polygons")
    return [_polygon(c, f"{where} polygon {i}") for i, c in enumerate(coords)]


def parse_roi(data: Any, source: Path, sha256: str = "", exclude_class: str = "exclude") -> Roi:
    """Include / exclude polygons of parsed GeoJSON ``data`` (read from ``source``, named in errors)."""
    roi = Roi(source=source, sha256=sha256)
    skipped: dict[str, int] = {}
    n_empty = 0
    excl = exclude_class.strip().lower()
    try:
        for where, geom, props in _features(data, "top level"):
            if not isinstance(geom, dict):
                n_empty += 1
                continue
            polys = _geometry_polygons(geom, where, skipped)
            name = (class_name(props) or "").strip().lower()
            (roi.exclude if excl and name == excl else roi.include).extend(polys)
    except RoiError as exc:
        raise RoiError(f"ROI file {source}: {exc}. Export the annotations from QuPath with "
                       "File > Export objects as GeoJSON, or fix the file") from None
    if skipped:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(skipped.items()))
        roi.warnings.append(f"ROI file {source.name}: ignored {kinds} (only Polygon/MultiPolygon mark regions)")
    if n_empty:
        roi.warnings.append(f"ROI file {source.name}: ignored {n_empty} feature(s) without a geometry")
    if not roi.include and not roi.exclude:
        raise RoiError(f"ROI file {source} has no Polygon or MultiPolygon feature; draw area annotations "
                       "(rectangle, polygon, brush) in QuPath and export them as GeoJSON")
    return roi


def load_roi(path: str | Path, exclude_class: str = "exclude") -> Roi:
    """Read a GeoJSON ROI file (see the module docstring); :class:`RoiError` names the file on bad input."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RoiError(f"ROI file {path} cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RoiError(f"ROI file {path} is not valid JSON ({exc}); export it again from QuPath as GeoJSON") from None
    return parse_roi(data, path, hashlib.sha256(raw).hexdigest(), exclude_class)


def _fill_even_odd(rings: list[np.ndarray], out: np.ndarray) -> None:
    """Set the pixels of ``out`` (h, w bool) whose centre is inside ``rings`` by the even-odd rule (so
    holes stay out).

    ``rings`` are in mask corner coordinates (pixel ``i`` spans ``[i, i + 1)``, its centre is
    ``i + 0.5``). A scanline fill: every edge crosses the pixel-centre rows ``y + 0.5`` in
    ``[y_min, y_max)``; the sorted crossings of a row pair up into spans."""
    h, w = out.shape
    rows, xs = [], []
    for ring in rings:
        p0, p1 = ring, np.roll(ring, -1, axis=0)
        lo = np.clip(np.ceil(np.minimum(p0[:, 1], p1[:, 1]) - 0.5), 0, h).astype(np.int64)
        hi = np.clip(np.ceil(np.maximum(p0[:, 1], p1[:, 1]) - 0.5), 0, h).astype(np.int64)
        n = np.maximum(hi - lo, 0)
        if not n.any():
            continue
        edge = np.repeat(np.arange(len(ring)), n)
        row = np.repeat(lo, n) + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        a, b = p0[edge], p1[edge]
        rows.append(row)
        xs.append(a[:, 0] + (row + 0.5 - a[:, 1]) * (b[:, 0] - a[:, 0]) / (b[:, 1] - a[:, 1]))
    if not rows:
        return
    row, x = np.concatenate(rows), np.concatenate(xs)
    order = np.lexsort((x, row))
    row, x = row[order], x[order]
    start = np.clip(np.ceil(x[0::2] - 0.5), 0, w).astype(np.int64)  # pixels i with x_left <= i + 0.5 < x_right
    stop = np.clip(np.ceil(x[1::2] - 0.5), 0, w).astype(np.int64)
    r0 = int(row[0])
    diff = np.zeros((int(row[-1]) - r0 + 1, w + 1), np.int16)
    np.add.at(diff, (row[0::2] - r0, start), 1)
    np.add.at(diff, (row[0::2] - r0, stop), -1)
    out[r0:int(row[-1]) + 1] |= np.cumsum(diff, axis=1)[:, :w] > 0


def rasterize(polygons: list[Polygon], shape: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """(h, w) bool on a mask with ``scale`` mask px per level-0 px: pixels whose centre lies in any of
    the level-0 ``polygons`` (outside their holes). Each polygon is filled on its own (even-odd over its
    rings) and OR-ed in, so overlapping annotations add up instead of cancelling.
    ``rasterize(tissue_polygons(m, s), m.shape, s)`` gives back ``well_composed(m)``."""
    out = np.zeros(shape, bool)
    sxy = np.array(scale, np.float64)
    for poly in polygons:
        _fill_even_odd([np.asarray(r, np.float64) * sxy for r in poly], out)
    return out


def roi_mask(roi: Roi, shape: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """(h, w) bool on the tissue mask's grid: inside the include polygons (the whole slide when the
    file has only exclusions) and outside every exclude polygon."""
    inside = rasterize(roi.include, shape, scale) if roi.include else np.ones(shape, bool)
    if roi.exclude:
        inside &= ~rasterize(roi.exclude, shape, scale)
    return inside
