"""Tile one slide: tissue → patch grid at a target µm/px → one HDF5 patch file (the per-slide contract).

``tile_slide`` is what the cohort runner calls once per slide (one reader handle per call). It
reads large regions — one band per grid row, across consecutive kept cells, chunked in width so
memory is bounded — and slices the patches out in memory, instead of one small read per patch.
Peak memory is one band + one write batch, independent of slide size. With
``output.store_pixels=false`` no patch pixel is read: the file holds the kept cells' coordinates,
grid and tissue fraction (from the low-resolution mask) only. The output is written under a
temporary name and renamed when complete (``sgcl.utils.atomic.atomic_path``).

Flat-patch check: a kept patch is *flat* when at least ``FLAT_PIXEL_FRACTION`` of its pixels lie
within ``FLAT_TOLERANCE`` levels of its dominant colour (:func:`preprocessing.tissue.dominant_colour_fraction`,
computed on the patches already in memory, in the writer thread). When at least
``output.flat_warn_fraction`` of a slide's kept patches are flat the slide gets a warning (wrong
colours, blank scan areas or tissue detection fooled by the background); with ``output.store_pixels=false``
no pixel is read and the check is skipped (file attr ``flat_check``).
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import sgcl
from sgcl.utils.atomic import atomic_path

from .config import TileConfig
from .geojson import Roi, RoiError, file_sha256, find_roi_file, load_roi, roi_mask, write_tissue_geojson
from .grid import PatchGeometry, edge_background, make_grid, plan_geometry, resize_patch, tissue_fractions
from .h5format import FORMAT_VERSION, PatchWriter
from .mpp import MppError, magnification, resolve_mpp
from .readers import SlideOpenError, SlideReader, SlideReadError, open_slide
from .tissue import TissueMask, background_fraction, detect_tissue, dominant_colour_fraction

TILER_VERSION = 1             # bump when a code change alters the output for the same parameters
MAX_BAND_PIXELS = 1 << 21     # pixels per region read (≈ 8 MB RGBA): bounds peak memory
WRITE_BATCH = 128             # patches per append to the HDF5 file (2 batches in flight)
QC_THUMBNAIL = 1024           # longer side of the QC picture, px
FLAT_TOLERANCE = 12           # levels (0-255, every channel) from a patch's dominant colour that count as that colour
FLAT_PIXEL_FRACTION = 0.9     # a patch is flat when at least this fraction of its pixels is its dominant colour
FLAT_WARNING_PREFIX = "mostly flat patches:"
FLAT_CHECK_SKIPPED = "skipped: coordinates only, no pixels read"


class SlideError(RuntimeError):
    """A slide that cannot be tiled; the message names the slide file and the fix."""


@dataclass
class SlideResult:
    slide_id: str
    path: str
    status: str  # "done"
    n_patches: int
    mpp: float
    mpp_source: str
    target_mpp: float
    achieved_mpp: float
    read_level: int
    tissue_area_mm2: float
    seconds: float
    qc_png: str | None
    warnings: list[str] = field(default_factory=list)
    params_hash: str = ""
    geojson: str | None = None
    flat_fraction: float | None = None  # fraction of kept patches that are flat; None: not checked (no pixels or no patches)

    def as_dict(self) -> dict:
        return asdict(self)


def params_hash(cfg: TileConfig, reader: str, mpp: float, roi_sha256: str | None = None) -> str:
    """Hash of everything that changes the patch file: patch/tissue/codec parameters, pixels or
    coordinates only, edge mode, reader, µm/px, code version, and the ROI file's content + exclude class
    when the slide has one. Options added after the first version (``patch.edge``,
    ``output.store_pixels``, the ROI) enter it only when they differ from what that version wrote, so
    files tiled before they existed stay valid."""
    out = cfg.output
    codec = {"codec": out.codec}
    if out.codec == "jpeg":
        codec["jpeg_quality"] = out.jpeg_quality
    if out.codec == "gzip":
        codec["gzip_level"] = out.gzip_level
    if not out.store_pixels:
        codec = {"store_pixels": False}  # no imgs: the codec changes nothing
    patch = asdict(cfg.patch)
    if patch["edge"] == "skip":
        del patch["edge"]
    payload = {
        "tiler_version": TILER_VERSION, "format_version": FORMAT_VERSION, "reader": reader, "mpp": repr(float(mpp)),
        "patch": patch, "tissue": asdict(cfg.tissue), "output": codec,
    }
    if roi_sha256 is not None:  # absent without an ROI, so hashes of slides tiled before ROIs existed stay valid
        payload["roi"] = {"sha256": roi_sha256, "exclude_class": cfg.roi_exclude_class.strip().lower()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def slide_params_hash(path, cfg: TileConfig, mpp_override: float | None = None, slide_id: str | None = None) -> str:
    """The ``params_hash`` that ``tile_slide`` would record for ``path`` (opens the header only, reads no
    pixels): a cohort runner compares it with an existing file's attr to decide skip vs redo.
    Raises :class:`SlideError` like ``tile_slide`` for unopenable slides, a missing µm/px or ROI file."""
    path = Path(path)
    roi_file = _roi_file(path, cfg, slide_id or path.stem)[0]
    reader = _open(path, cfg)
    try:
        mpp = _slide_mpp(path, reader, cfg, mpp_override)
        return params_hash(cfg, reader.name, mpp.value, file_sha256(roi_file) if roi_file else None)
    finally:
        reader.close()


def flat_warning(n_flat: int, n_patches: int, warn_fraction: float) -> str | None:
    """The slide's warning when at least ``warn_fraction`` of its ``n_patches`` kept patches are flat, else ``None``."""
    if n_patches <= 0 or n_flat / n_patches < warn_fraction:
        return None
    return (f"{FLAT_WARNING_PREFIX} {n_flat} of {n_patches} kept patches ({n_flat / n_patches:.0%}) are one flat colour "
            f"(≥ {FLAT_PIXEL_FRACTION:.0%} of their pixels within {FLAT_TOLERANCE} levels of it): wrong colours, blank "
            "areas or background taken for tissue? See the QC picture, flat patches outlined red")


def _slide_mpp(path: Path, reader: SlideReader, cfg: TileConfig, mpp_override: float | None):
    """The slide's µm/px (CSV override, header, ``assume_mpp``); :class:`SlideError` naming the fixes when none."""
    try:
        return resolve_mpp(path, reader.properties, mpp_override, cfg.assume_mpp)
    except MppError as exc:
        raise SlideError(str(exc)) from exc


def _roi_file(path: Path, cfg: TileConfig, slide_id: str) -> tuple[Path | None, str | None]:
    try:
        return find_roi_file(cfg.roi, slide_id, path)
    except RoiError as exc:
        raise SlideError(f"{path}: {exc}") from exc


def _load_roi(path: Path, cfg: TileConfig, slide_id: str, warnings: list[str]) -> Roi | None:
    """The slide's ROI (``cfg.roi``: a GeoJSON file, or a folder of ``<slide_id>.geojson``), or ``None``."""
    roi_file, warning = _roi_file(path, cfg, slide_id)
    if warning:
        warnings.append(warning)
    if roi_file is None:
        return None
    try:
        roi = load_roi(roi_file, cfg.roi_exclude_class)
    except RoiError as exc:
        raise SlideError(f"{path}: {exc}") from exc
    warnings.extend(roi.warnings)
    return roi


def slide_tissue(reader: SlideReader, path: Path, mpp: float, cfg: TileConfig, roi: Roi | None,
                 warnings: list[str]) -> TissueMask:
    """The tissue mask of an open slide at ``tissue.detection_mpp``, restricted to ``roi`` when given."""
    w0, h0 = reader.dimensions
    det_ds = max(1.0, cfg.tissue.detection_mpp / mpp)
    try:
        low = reader.read_scaled(det_ds)
    except SlideReadError as exc:
        raise SlideError(f"{exc}. The file is probably corrupt or truncated: copy it again or re-export it") from exc
    tissue = detect_tissue(low, mpp * w0 / low.shape[1], cfg.tissue, level0_size=(w0, h0))
    if roi is not None:
        inside = roi_mask(roi, tissue.mask.shape, tissue.scale)
        if not inside.any():
            warnings.append(f"ROI {roi.source.name} covers none of the slide ({w0}x{h0} px): its coordinates "
                            "must be level-0 pixels of this slide (as QuPath exports them)")
        tissue = replace(tissue, mask=tissue.mask & inside)
    return tissue


def write_slide_geojson(path, geojson_path: Path, cfg: TileConfig, slide_id: str | None = None,
                        mpp_override: float | None = None) -> Path:
    """Only the tissue GeoJSON of a slide (tissue detection + ROI, no patches): for a slide tiled before
    GeoJSON was written. The same mask as ``tile_slide``, so the same file."""
    path = Path(path)
    slide_id = slide_id or path.stem
    roi = _load_roi(path, cfg, slide_id, [])
    reader = _open(path, cfg)
    try:
        mpp = _slide_mpp(path, reader, cfg, mpp_override)
        tissue = slide_tissue(reader, path, mpp.value, cfg, roi, [])
        return write_tissue_geojson(geojson_path, tissue.mask, tissue.scale, slide_id)
    finally:
        reader.close()


def _runs(cols: np.ndarray, x_level: np.ndarray, read_size: int, max_width: int) -> list[np.ndarray]:
    """Split sorted kept columns into runs read as one region: break wherever the next cell does not
    touch or overlap the previous one (reading a gap costs as much as reading a patch: OpenSlide's
    per-call overhead is small, its per-pixel cost is not) or the region would exceed ``max_width``."""
    runs, start = [], 0
    for i in range(1, len(cols) + 1):
        if i == len(cols):
            runs.append(cols[start:i])
            break
        gap = x_level[cols[i]] - (x_level[cols[i - 1]] + read_size)
        width = x_level[cols[i]] + read_size - x_level[cols[start]]
        if gap > 0 or width > max_width:
            runs.append(cols[start:i])
            start = i
    return runs


def _open(path: Path, cfg: TileConfig) -> SlideReader:
    try:
        return open_slide(path, cfg.reader)
    except SlideOpenError as exc:
        raise SlideError(str(exc)) from exc
    except ValueError as exc:  # unknown reader name
        raise SlideError(f"{path}: {exc}") from exc


def tile_slide(path, out_h5: Path, cfg: TileConfig, slide_id: str | None = None,
               mpp_override: float | None = None, qc_png: Path | None = None, progress: bool = False,
               geojson_path: Path | None = None, stitch: Path | None = None) -> SlideResult:
    """Tile ``path`` into ``out_h5`` (atomically); write the QC picture to ``qc_png`` (PNG or JPEG by its
    suffix), the tissue outlines (level-0 GeoJSON, QuPath annotations) to ``geojson_path`` and CLAM's
    stitch picture to ``stitch`` when given. With ``cfg.roi`` only tissue inside the ROI polygons (minus
    those of class ``cfg.roi_exclude_class``) is tiled.

    Raises :class:`SlideError` (naming the slide and the fix) when the slide cannot be opened, has no
    µm/px, has a missing or bad ROI file, or a region cannot be decoded; no output file exists afterwards.
    """
    t_start = time.perf_counter()
    path, out_h5 = Path(path), Path(out_h5)
    slide_id = slide_id or path.stem
    warnings: list[str] = []
    roi = _load_roi(path, cfg, slide_id, warnings)
    reader = _open(path, cfg)
    try:
        mpp = _slide_mpp(path, reader, cfg, mpp_override)
        pc, tc = cfg.patch, cfg.tissue
        try:
            geom = plan_geometry(reader.level_downsamples, mpp.value, pc.target_mpp, pc.patch_size, pc.stride)
        except ValueError as exc:
            raise SlideError(f"{path}: {exc}; fix the patch section of the config") from exc
        if geom.upsampled:
            warnings.append(f"slide is coarser ({mpp.value:g} µm/px) than the target {pc.target_mpp:g} µm/px: patches are upsampled")
        if abs(mpp.x - mpp.y) > 0.01 * mpp.value:
            warnings.append(f"non-square pixels (mpp x={mpp.x:g}, y={mpp.y:g}); their mean is used")
        w0, h0 = reader.dimensions

        # -- tissue ---------------------------------------------------------------------
        t0 = time.perf_counter()
        tissue = slide_tissue(reader, path, mpp.value, cfg, roi, warnings)
        phash = params_hash(cfg, reader.name, mpp.value, roi.sha256 if roi else None)
        try:
            grid = make_grid(geom, reader.level_dimensions, pc.edge)
        except ValueError as exc:
            raise SlideError(f"{path}: {exc}; fix patch.edge in the config") from exc
        frac = tissue_fractions(tissue.mask, tissue.scale, grid, geom.patch_size_level0,
                                whole_footprint=pc.edge != "skip")
        keep = (frac >= tc.min_tissue_fraction) & (frac > 0)
        seconds_tissue = time.perf_counter() - t0

        # -- patches --------------------------------------------------------------------
        t1 = time.perf_counter()
        stats = {"n_candidates": int(keep.sum()), "n_background": 0, "n_reads": 0, "flat": []}
        with atomic_path(out_h5) as tmp:
            writer = PatchWriter(tmp, pc.patch_size, codec=cfg.output.codec if cfg.output.store_pixels else None,
                                 quality=cfg.output.jpeg_quality, gzip_level=cfg.output.gzip_level)
            try:
                if cfg.output.store_pixels:
                    _stream_patches(reader, geom, grid, frac, keep, cfg, writer, stats, progress, slide_id)
                else:
                    _write_coords(grid, frac, keep, writer)
                seconds_patches = time.perf_counter() - t1
                coords = writer.coords[:]  # read back: nothing per patch is kept in memory while tiling
                if grid.n_cols == 0 or grid.n_rows == 0:
                    warnings.append(f"no patches: the slide ({w0}x{h0} px) is smaller than one patch "
                                    f"({geom.patch_size_level0:.1f} level-0 px at {pc.target_mpp:g} um/px)")
                elif writer.n == 0:
                    warnings.append("no patches: no grid cell passed the tissue and background filters")
                flat = np.concatenate(stats["flat"]) if stats["flat"] else np.zeros(0, bool)
                if cfg.output.store_pixels:
                    warning = flat_warning(int(flat.sum()), writer.n, cfg.output.flat_warn_fraction)
                    warnings.extend([warning] if warning else [])
                attrs = _file_attrs(path, slide_id, reader, mpp, geom, cfg, tissue, stats, warnings,
                                    {"tissue": seconds_tissue, "patches": seconds_patches,
                                     "total": time.perf_counter() - t_start}, writer.n, flat)
                attrs.update(params_hash=phash, roi_path=str(roi.source.resolve()) if roi else "",
                             roi_sha256=roi.sha256 if roi else "", roi_exclude_class=cfg.roi_exclude_class if roi else "")
                writer.set_attrs(attrs, _clam_trident_attrs(slide_id, reader, mpp.value, geom, out_h5))
            finally:
                writer.close()
        qc_path = None
        if qc_png is not None or stitch is not None:
            from .qc import render_stitch, write_picture, write_qc_png

            thumb = reader.thumbnail(QC_THUMBNAIL)
            if qc_png is not None:
                caption = (f"{slide_id}: {len(coords)} patches {pc.patch_size}px at {geom.achieved_mpp:.4g} um/px | "
                           f"slide {mpp.value:.4g} um/px ({mpp.source}) | tissue {tissue.area_mm2:.2f} mm2"
                           + (f" in ROI {roi.source.name}" if roi else "")
                           + (f" | FLAT: {int(flat.sum())} of {len(coords)} patches one colour (red)"
                              if any(w.startswith(FLAT_WARNING_PREFIX) for w in warnings) else ""))
                qc_path = str(write_qc_png(qc_png, thumb, (w0, h0), tissue.mask, coords, geom.patch_size_level0,
                                           caption, roi=roi, flat=flat if len(flat) == len(coords) else None))
            if stitch is not None:
                write_picture(stitch, render_stitch(thumb, (w0, h0), coords, geom.patch_size_level0))
        geojson = None
        if geojson_path is not None:
            geojson = str(write_tissue_geojson(geojson_path, tissue.mask, tissue.scale, slide_id))
        return SlideResult(
            slide_id=slide_id, path=str(path), status="done", n_patches=int(len(coords)), mpp=mpp.value,
            mpp_source=mpp.source, target_mpp=pc.target_mpp, achieved_mpp=geom.achieved_mpp,
            read_level=geom.read_level, tissue_area_mm2=tissue.area_mm2, seconds=time.perf_counter() - t_start,
            qc_png=qc_path, warnings=warnings, params_hash=phash, geojson=geojson,
            flat_fraction=float(flat.mean()) if cfg.output.store_pixels and len(flat) else None,
        )
    finally:
        reader.close()


def _write_coords(grid, frac: np.ndarray, keep: np.ndarray, writer: PatchWriter) -> None:
    """Coordinates only: the kept cells, row-major like ``_stream_patches``, without reading a pixel."""
    rows, cols = np.nonzero(keep)
    writer.append(None, np.stack([grid.x0[cols], grid.y0[rows]], 1), np.stack([cols, rows], 1), frac[rows, cols])


def _stream_patches(reader: SlideReader, geom: PatchGeometry, grid, frac: np.ndarray, keep: np.ndarray,
                    cfg: TileConfig, writer: PatchWriter, stats: dict, progress: bool,
                    slide_id: str) -> None:
    tc, r, L, P = cfg.tissue, geom.read_size, geom.read_level, geom.patch_size
    background = edge_background(cfg.patch.edge)
    max_width = max(r, MAX_BAND_PIXELS // r)
    rows = np.nonzero(keep.any(axis=1))[0]
    # Two batch buffers: while a writer thread checks/encodes/appends one (numpy, cv2 and h5py release
    # the GIL), this thread reads bands into the other. Memory: 2 batches + 1 band, whatever the slide.
    buffers = [(np.empty((WRITE_BATCH, P, P, 3), np.uint8), np.empty((WRITE_BATCH, 5), np.float64)) for _ in range(2)]
    pending: list[Future | None] = [None, None]
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="patch-writer")
    cur, n = 0, 0
    batch, meta = buffers[cur]

    def write(imgs: np.ndarray, m: np.ndarray) -> None:
        ok = background_fraction(imgs, tc.white_threshold, tc.black_threshold) <= tc.max_background_fraction
        stats["n_background"] += int(len(imgs) - ok.sum())
        flat = dominant_colour_fraction(imgs, FLAT_TOLERANCE) >= FLAT_PIXEL_FRACTION
        stats["flat"].append(flat[ok])
        if ok.all():  # the usual case: no copy of the batch
            writer.append(imgs, m[:, :2].astype(np.int64), m[:, 2:4].astype(np.int32), m[:, 4].astype(np.float32))
        elif ok.any():
            m = m[ok]
            writer.append(imgs[ok], m[:, :2].astype(np.int64), m[:, 2:4].astype(np.int32), m[:, 4].astype(np.float32))

    def flush() -> None:
        nonlocal n, cur, batch, meta
        if n == 0:
            return
        pending[cur] = pool.submit(write, batch[:n], meta[:n])
        cur, n = 1 - cur, 0
        if pending[cur] is not None:
            pending[cur].result()  # the other buffer must be written before it is refilled
            pending[cur] = None
        batch, meta = buffers[cur]

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(keep.sum()), desc=f"tile {slide_id}", unit="patch", leave=False)
    try:
        for j in rows:
            cols = np.nonzero(keep[j])[0]
            y0 = int(grid.y0[j])
            for run in _runs(cols, grid.x_level, r, max_width):
                bx = int(grid.x_level[run[0]])
                width = int(grid.x_level[run[-1]]) + r - bx
                try:
                    band = reader.read_region(int(grid.x0[run[0]]), y0, L, width, r, background)
                except SlideReadError as exc:
                    raise SlideError(
                        f"{exc} (grid row {j}). The slide file is corrupt or truncated: copy it again or re-export it; "
                        "the rest of the cohort is not affected"
                    ) from exc
                stats["n_reads"] += 1
                for c in run:
                    ox = int(grid.x_level[c]) - bx
                    window = band[:, ox:ox + r]
                    if geom.resize:
                        batch[n] = resize_patch(window, P)
                    else:
                        batch[n] = window
                    meta[n] = (grid.x0[c], y0, c, j, frac[j, c])
                    n += 1
                    if n == WRITE_BATCH:
                        flush()
                if bar is not None:
                    bar.update(len(run))
        flush()
        for f in pending:
            if f is not None:
                f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()


def _file_attrs(path: Path, slide_id: str, reader: SlideReader, mpp, geom: PatchGeometry, cfg: TileConfig,
                tissue, stats: dict, warnings: list[str], seconds: dict, n: int, flat: np.ndarray) -> dict:
    st = path.stat()
    w0, h0 = reader.dimensions
    return {
        "slide_id": slide_id, "source_path": str(path.resolve()), "source_size": int(st.st_size),
        "source_mtime": float(st.st_mtime), "vendor": reader.vendor, "reader": reader.name,
        "level0_width": int(w0), "level0_height": int(h0), "level_count": reader.level_count,
        "mpp": mpp.value, "mpp_x": mpp.x, "mpp_y": mpp.y, "mpp_source": mpp.source,
        "target_mpp": geom.target_mpp, "achieved_mpp": geom.achieved_mpp, "read_level": geom.read_level,
        "read_downsample": geom.read_downsample, "read_size": geom.read_size,
        "patch_size": geom.patch_size, "patch_size_level0": geom.patch_size_level0,
        "stride": geom.stride, "stride_level0": geom.stride_level0,
        "edge": cfg.patch.edge, "store_pixels": bool(cfg.output.store_pixels),
        "codec": cfg.output.codec if cfg.output.store_pixels else "none",
        "jpeg_quality": cfg.output.jpeg_quality if cfg.output.store_pixels and cfg.output.codec == "jpeg" else 0,
        "background_check": "pixels" if cfg.output.store_pixels else FLAT_CHECK_SKIPPED,
        "flat_check": (f"pixels: flat = at least {FLAT_PIXEL_FRACTION:g} of the pixels within {FLAT_TOLERANCE} levels "
                       "of the patch's dominant colour") if cfg.output.store_pixels else FLAT_CHECK_SKIPPED,
        "n_flat": int(flat.sum()) if cfg.output.store_pixels else -1,
        "flat_fraction": float(flat.mean()) if cfg.output.store_pixels and len(flat) else float("nan"),
        "tissue_params": asdict(cfg.tissue), "tissue_threshold": tissue.threshold,
        "tissue_area_mm2": tissue.area_mm2, "tissue_mask_mpp": tissue.mpp,
        "pen_area_mm2": tissue.pen_pixels * tissue.mpp ** 2 / 1e6,
        "n_patches": int(n), "n_candidates": stats["n_candidates"], "n_background_dropped": stats["n_background"],
        "n_region_reads": stats["n_reads"],
        "tiler_version": TILER_VERSION,
        "package_version": sgcl.__version__, "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds_tissue": seconds["tissue"], "seconds_patches": seconds["patches"], "seconds_total": seconds["total"],
        "warnings": json.dumps(warnings),
    }


def _clam_trident_attrs(slide_id: str, reader: SlideReader, mpp: float, geom: PatchGeometry, out_h5: Path) -> dict:
    """Attrs on ``coords`` that CLAM's and TRIDENT's feature extractors read.

    They describe the READ grid: ``patch_size`` px at ``patch_level`` (and, for TRIDENT,
    ``patch_size`` px at ``target_magnification``), so both tools read exactly the region this tiler
    read and resize it to their encoder's input; our output size/µm/px are the file attrs.
    ``save_path`` is CLAM's (the patches folder), ``savetodir`` TRIDENT's (the folder above it: the
    ``<mag>x_<size>px_<overlap>px_overlap`` folder in the trident layout).
    """
    L = geom.read_level
    lw, lh = reader.level_dimensions[L]
    w0, h0 = reader.dimensions
    level0_mag = magnification(mpp)
    return {
        "patch_size": int(geom.read_size), "patch_level": int(L),
        "downsample": np.array([geom.read_downsample, geom.read_downsample], np.float64),
        "downsampled_level_dim": np.array([lw, lh], np.int64), "level_dim": np.array([lw, lh], np.int64),
        "name": slide_id, "save_path": str(out_h5.parent), "savetodir": str(out_h5.parent.parent),
        "patch_size_level0": int(round(geom.read_size * geom.read_downsample)),
        "level0_magnification": level0_mag, "target_magnification": level0_mag / geom.read_downsample,
        "overlap": int(max(0, geom.read_size - round(geom.read_stride))),
        "level0_width": int(w0), "level0_height": int(h0),
    }
