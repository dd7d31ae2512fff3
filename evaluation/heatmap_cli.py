"""``sgcl heatmap``: per-patch scores (MIL attention, or any saved score) drawn on each slide.

Examples::

    # after `sgcl demo --out demo_out`: redraw the demo's heatmap from its saved scores, refined, at level 0
    sgcl heatmap --slides data/demo --features demo_out/features/sgcl --scores demo_out/heatmap --out heat --refine --level 0
    # attention of a MIL model (`sgcl eval mil`) on the slides of a feature folder
    sgcl heatmap --slides /data/slides --features outputs/features --model outputs/mil --out outputs/heatmaps
    # any per-patch score: an h5 with `scores` (or `scores/<name>`) or a CSV with x,y,score columns
    sgcl heatmap --slides cohort.csv --features outputs/features/h5_files --scores my_scores/ --out heat
    # at 8 µm/px, min-max normalised, coolwarm, overlapping-patch refinement, scores below 0.3 hidden
    sgcl heatmap --slides slide.svs --features feats --scores s.h5 --out heat --mpp 8 --normalize minmax \\
        --cmap coolwarm --refine --threshold 0.3
    # TRIDENT's features folder, pyramid level 2, the 20 best patches as boxes and points for QuPath
    sgcl heatmap --slides wsis/ --features job/20x_256px_0px_overlap/features_uni_v1 --model mil --out heat \\
        --level 2 --topk 20 topk_geometry=both

Per slide, in --out: ``<slide>_heatmap.png`` (the slide picture with the scores blended in, a colour bar
underneath), ``<slide>_scores.h5`` (``coords``, ``scores/<name>``; attrs), ``<slide>_topk.geojson`` (the
k best patches, level-0 px, QuPath annotations with the score as a measurement), ``<slide>_gallery.png``
(top and bottom patches), and ``manifest.csv``. Exit code 0, or 2 for bad inputs (the message names the
file and the fix).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import h5py
import numpy as np

from evaluation.heatmap import HeatmapError
from sgcl import __version__
from sgcl.config import ConfigError, add_config_arguments, bounded, config_from_args, print_config, to_dict
from sgcl.utils.atomic import STORAGE_ERRNOS, atomic_path, atomic_write_text, ensure_writable_dir

MAX_PICTURE_PIXELS = 1 << 28  # 268 M px (~800 MB RGB): a finer --mpp / --level is refused


@dataclass
class HeatmapConfig:
    slides: list[str] = field(default_factory=list)    # slide files, folders or slide-list CSVs (found by slide id)
    features: list[str] = field(default_factory=list)  # feature .h5 files or folders (h5_files/, features_<enc>/)
    model: Optional[str] = None           # MIL model folder (`sgcl eval mil`): its per-patch attention and logits
    fold: Optional[int] = bounded(None, ge=0)  # the model's fold (default: as the model folder decides)
    scores: Optional[str] = None          # or saved scores: .h5 (`scores` / `scores/<name>`), .csv (x,y,<score>...) or a folder
    out_dir: str = "outputs/heatmaps"
    score: Optional[str] = None           # score drawn (default: attention when present, else the first)
    normalize: Literal["raw", "minmax", "percentile"] = "percentile"  # percentile = rank in [0, 1] (CLAM's default)
    vmin: Optional[float] = None          # normalize=raw: the score at the colour bar's left end (default: the lowest)
    vmax: Optional[float] = None          # normalize=raw: the score at its right end (default: the highest)
    cmap: str = "jet"                     # any matplotlib colour map (jet, coolwarm, viridis, ...)
    alpha: float = bounded(0.5, ge=0, le=1)  # opacity of the colours over the slide
    threshold: Optional[float] = None     # hide patches whose normalised score is below this
    level: Optional[int] = bounded(None, ge=0)  # draw on this pyramid level
    mpp: Optional[float] = bounded(None, gt=0)  # or at this µm/px (needs the slide's µm/px)
    max_size: int = bounded(2048, ge=16)  # default: the longer side of the picture is at most this
    refine: bool = False                  # overlapping-patch refinement (half-stride patches, interpolated)
    topk: int = bounded(10, ge=0)  # patches in <slide>_topk.geojson (0 = none)
    topk_geometry: Literal["box", "point", "both"] = "box"
    gallery: int = bounded(8, ge=0)  # top and bottom patches in <slide>_gallery.png (0 = none)
    gallery_tile: int = bounded(128, ge=8)  # px per gallery patch
    progress: bool = True

    def validate(self) -> None:
        """vmin < vmax when both are set; level and mpp are not both set."""
        if self.vmin is not None and self.vmax is not None and not self.vmin < self.vmax:
            raise ConfigError(f"vmax: {self.vmax} must be above vmin ({self.vmin})", key="vmax")
        if self.level is not None and self.mpp is not None:
            raise ConfigError("mpp: give level or mpp, not both", key="mpp")


FLAG_MAP = {"slides": "slides", "features": "features", "model": "model", "scores": "scores", "fold": "fold",
            "out": "out_dir", "score": "score", "normalize": "normalize", "cmap": "cmap", "alpha": "alpha",
            "threshold": "threshold", "level": "level", "mpp": "mpp", "max_size": "max_size", "refine": "refine",
            "topk": "topk", "gallery": "gallery"}


# -- the picture's resolution --------------------------------------------------------------------
def picture_downsample(reader, cfg: HeatmapConfig, slide_path: Path) -> float:
    """Level-0 px per picture px: ``level``'s downsample, ``mpp`` / the slide's µm/px, else a thumbnail of
    at most ``max_size`` px."""
    w0, h0 = reader.dimensions
    if cfg.level is not None and cfg.mpp is not None:
        raise HeatmapError("give --level or --mpp, not both")
    if cfg.level is not None:
        if not 0 <= cfg.level < reader.level_count:
            raise HeatmapError(f"{slide_path}: no level {cfg.level} (the slide has levels 0-{reader.level_count - 1})")
        ds = float(reader.level_downsamples[cfg.level])
    elif cfg.mpp is not None:
        from preprocessing.mpp import MppError, resolve_mpp

        try:
            slide_mpp = resolve_mpp(slide_path, reader.properties).value
        except MppError as exc:
            raise HeatmapError(f"{exc} For a heatmap, --level or --max-size need no µm/px.") from None
        if not cfg.mpp >= slide_mpp * 0.999:
            raise HeatmapError(f"--mpp {cfg.mpp} is finer than the slide's level 0 ({slide_mpp:.4g} µm/px)")
        ds = cfg.mpp / slide_mpp
    else:
        if cfg.max_size < 16:
            raise HeatmapError(f"max_size must be ≥ 16 px, got {cfg.max_size}")
        ds = max(1.0, max(w0, h0) / cfg.max_size)
    if (w0 / ds) * (h0 / ds) > MAX_PICTURE_PIXELS:
        raise HeatmapError(f"{slide_path}: a picture at downsample {ds:.3g} would be {w0 / ds:.0f} x {h0 / ds:.0f} px; "
                           "choose a coarser --mpp or --level")
    return ds


# -- patches for the gallery ----------------------------------------------------------------------
def read_patches(indices: np.ndarray, coords: np.ndarray, size0: float, reader, tile: int,
                 patch_file: Path | None) -> list[np.ndarray]:
    """The patches at ``indices``: stored pixels when ``patch_file`` has ``imgs`` at the same coords, else read
    from the slide at their level-0 coords (the level nearest to ``tile`` px per patch, resized)."""
    if len(indices) == 0:
        return []
    if patch_file is not None:
        from preprocessing.h5format import PatchFile, PatchFileError

        try:
            with PatchFile(patch_file) as pf:
                if pf.has_pixels and len(pf) == len(coords) and np.array_equal(pf.coords()[indices], coords[indices]):
                    return list(pf.read_many(indices))
        except (PatchFileError, OSError):
            pass  # not a usable patch file: read from the slide
    import cv2

    level = reader.best_level_for_downsample(max(1.0, size0 / tile))
    ds = float(reader.level_downsamples[level])
    side = max(1, int(round(size0 / ds)))
    out = []
    for i in indices:
        x, y = (int(v) for v in coords[i])
        img = reader.read_region(x, y, level, side, side)
        out.append(cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA if side >= tile else cv2.INTER_CUBIC))
    return out


# -- one slide ------------------------------------------------------------------------------------
def write_scores_h5(path: Path, coords: np.ndarray, scores: dict[str, np.ndarray], attrs: dict) -> Path:
    """``coords`` (N, 2) int64 and ``scores/<name>`` (N,) float32, with ``attrs``, atomically."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
            g = f.create_group("scores")
            for name, v in scores.items():
                g.create_dataset(name, data=np.asarray(v, np.float32))
            for k, v in attrs.items():
                f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v)
    return path


def choose_score(scores: dict[str, np.ndarray], wanted: str | None, where: str) -> str:
    if wanted:
        if wanted not in scores:
            raise HeatmapError(f"{where}: no score {wanted!r}; it has {', '.join(scores)} (set --score)")
        return wanted
    return "attention" if "attention" in scores else next(iter(scores))


def heatmap_slide(slide_path: Path, slide_id: str, coords: np.ndarray, size0: float, scores: dict[str, np.ndarray],
                  cfg: HeatmapConfig, out_dir: Path, patch_file: Path | None = None, meta: dict | None = None) -> dict:
    """Draw and write every output of one slide; returns its manifest row (paths relative to ``out_dir``)."""
    from evaluation.heatmap import (normalize_scores, render_gallery, render_heatmap, score_map, top_indices,
                                    topk_feature_collection)
    from preprocessing.qc import write_picture
    from preprocessing.readers import SlideOpenError, open_slide

    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    if len(coords) == 0:
        raise HeatmapError(f"slide {slide_id}: no patches to draw")
    name = choose_score(scores, cfg.score, f"slide {slide_id}")
    raw = np.asarray(scores[name], np.float64)
    if not np.isfinite(raw).any():
        raise HeatmapError(f"slide {slide_id}: score {name!r} has no finite value")
    norm = normalize_scores(raw, cfg.normalize)
    if cfg.normalize == "raw":
        vmin = float(np.nanmin(norm)) if cfg.vmin is None else cfg.vmin
        vmax = float(np.nanmax(norm)) if cfg.vmax is None else cfg.vmax
    else:
        vmin, vmax = 0.0, 1.0
    try:
        reader = open_slide(slide_path)
    except SlideOpenError as exc:
        raise HeatmapError(str(exc)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    row: dict = {"slide_id": slide_id, "slide": str(slide_path), "n_patches": len(coords), "score": name}
    with reader:
        ds = picture_downsample(reader, cfg, slide_path)
        thumb = reader.read_scaled(ds)
        values = score_map(coords, norm, size0, ds, thumb.shape[:2], cfg.refine)
        label = f"{name} ({cfg.normalize}{', refined' if cfg.refine else ''})"
        picture = render_heatmap(thumb, values, cfg.cmap, vmin, vmax, cfg.alpha, cfg.threshold, label)
        heat = write_picture(out_dir / f"{slide_id}_heatmap.png", picture)
        row.update(heatmap=heat.name, width=int(thumb.shape[1]), height=int(thumb.shape[0]), downsample=ds)
        if cfg.topk > 0:
            collection = topk_feature_collection(coords, raw, size0, cfg.topk, slide_id, name, cfg.topk_geometry)
            dest = out_dir / f"{slide_id}_topk.geojson"
            atomic_write_text(dest, json.dumps(collection, separators=(",", ":")) + "\n")
            row["topk_geojson"] = dest.name
        if cfg.gallery > 0:
            top, bottom = top_indices(raw, cfg.gallery), top_indices(raw, cfg.gallery, largest=False)
            imgs = read_patches(np.concatenate([top, bottom]), coords, size0, reader, cfg.gallery_tile, patch_file)
            gallery = render_gallery(imgs[:len(top)], raw[top], imgs[len(top):], raw[bottom], cfg.gallery_tile)
            row["gallery"] = write_picture(out_dir / f"{slide_id}_gallery.png", gallery).name
    attrs = {"format": "sgcl-patch-scores", "format_version": 1, "slide_id": slide_id, "slide_path": str(slide_path),
             "patch_size_level0": float(size0), "drawn_score": name, "normalize": cfg.normalize, "refine": cfg.refine,
             "picture_downsample": float(ds), "heatmap_png": row["heatmap"], "sgcl_version": __version__,
             "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **(meta or {})}
    row["scores_h5"] = write_scores_h5(out_dir / f"{slide_id}_scores.h5", coords, scores, attrs).name
    return row


# -- driver ---------------------------------------------------------------------------------------
def run_heatmap(cfg: HeatmapConfig) -> list[dict]:
    """Every slide of ``cfg.features``: scores, heatmap, scores h5, top-k GeoJSON, gallery; ``manifest.csv``."""
    from tqdm import tqdm

    from evaluation.heatmap_inputs import (feature_files, find_slide, mil_patch_scores, model_scores, read_feature_slide,
                                           read_scores_file, scores_file_for, slide_index)
    from evaluation.reports import write_csv

    if (cfg.model is None) == (cfg.scores is None):
        raise HeatmapError("give exactly one score source: --model <MIL model folder> or --scores <file or folder>")
    if not cfg.slides:
        raise HeatmapError("no slides: pass --slides <slide files, folders or a slide-list CSV>")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise HeatmapError(f"alpha must be in [0, 1], got {cfg.alpha}")
    from evaluation.heatmap import colormap_lut

    colormap_lut(cfg.cmap)  # an unknown colour map fails before any work
    if cfg.model is not None:
        mil_patch_scores(Path(cfg.model))  # so does a missing model folder
    out_dir = ensure_writable_dir(cfg.out_dir)  # and a read-only or full output folder
    slides = slide_index(cfg.slides)
    files = feature_files(cfg.features)

    def downsamples_of(sid: str):
        from preprocessing.readers import open_slide

        with open_slide(slides[sid]) as r:
            return list(r.level_downsamples)

    # check every input before drawing anything
    jobs, empty = [], []
    for path in files:
        fs = read_feature_slide(path, lambda sid: downsamples_of(sid) if sid in slides else None)
        if len(fs.coords) == 0:  # no patches (e.g. no tissue): nothing to draw, and its slide is not needed
            empty.append(fs.slide_id)
            continue
        jobs.append((fs, find_slide(fs, slides)))
    if empty:
        from sgcl.utils.empty_slides import ignored_empty_note

        print(f"sgcl heatmap: {ignored_empty_note(empty)}", file=sys.stderr)
    rows = []
    for fs, slide_path in tqdm(jobs, desc="heatmaps", unit="slide", disable=not cfg.progress):
        source = f"model:{cfg.model}" if cfg.model is not None else f"scores:{cfg.scores}"
        try:  # one slide that fails (a decode error, bad scores) is recorded; the others are still drawn
            if cfg.model is not None:
                scores = model_scores(Path(cfg.model), fs, cfg.fold)
            else:
                sfile = scores_file_for(Path(cfg.scores), fs)
                scores, source = read_scores_file(sfile, fs), f"scores:{sfile}"
            meta = {"features_path": str(fs.path), "score_source": source,
                    "fold": -1 if cfg.fold is None else cfg.fold, "config": to_dict(cfg)}
            row = {"status": "done", **heatmap_slide(slide_path, fs.slide_id, fs.coords, fs.size0, scores, cfg,
                                                     out_dir, fs.patch_file, meta), "error": ""}
        except Exception as exc:  # noqa: BLE001 - reported per slide, in the manifest and on stderr
            if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:  # full / read-only output: so is every slide
                raise OSError(exc.errno, exc.strerror, exc.filename or str(out_dir)) from exc
            error = str(exc) if isinstance(exc, HeatmapError) else f"{type(exc).__name__}: {exc}"
            print(f"sgcl heatmap: {fs.slide_id}: FAILED: {error}", file=sys.stderr)
            row = {"status": "failed", "slide_id": fs.slide_id, "error": error}
        rows.append({**row, "features": str(fs.path), "source": source})
    write_csv(out_dir / "manifest.csv", rows)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgcl heatmap", description=__doc__.split("\n\n")[0],
                                epilog="Examples::" + __doc__.split("Examples::", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", nargs="+", help="slide files, folders or a slide-list CSV; each feature file's slide "
                   "is found by its slide id (slides=)")
    p.add_argument("--features", nargs="+", help="feature .h5 files or folders of any layout: `sgcl extract --out`, "
                   "h5_files/ (CLAM), features_<encoder>/ (TRIDENT) (features=)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="MIL model folder written by `sgcl eval mil`: its attention and logits (model=)")
    src.add_argument("--scores", help="per-patch scores: .h5 with `scores` or `scores/<name>`, .csv with x,y,<score> "
                     "columns, or a folder of <slide>_scores.h5 / <slide>.csv (scores=)")
    p.add_argument("--fold", type=int, help="which fold's model (with --model)")
    p.add_argument("--out", help="output folder (out_dir=)")
    p.add_argument("--score", help="score to draw (default: attention, else the first)")
    p.add_argument("--normalize", choices=["raw", "minmax", "percentile"], help="score scaling (default percentile)")
    p.add_argument("--cmap", help="matplotlib colour map (default jet)")
    p.add_argument("--alpha", type=float, help="opacity of the colours (default 0.5)")
    p.add_argument("--threshold", type=float, help="hide patches whose normalised score is below this")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--level", type=int, help="draw on this pyramid level")
    res.add_argument("--mpp", type=float, help="draw at this µm/px")
    p.add_argument("--max-size", dest="max_size", type=int, help="default picture: longer side ≤ this (2048)")
    p.add_argument("--refine", action="store_true", default=None,
                   help="overlapping-patch refinement: half-stride patches interpolated from their neighbours")
    p.add_argument("--topk", type=int, help="best patches written to <slide>_topk.geojson (default 10)")
    p.add_argument("--gallery", type=int, help="top and bottom patches in <slide>_gallery.png (default 8)")
    add_config_arguments(p, example="topk_geometry=both")
    return p


def main(argv: list[str] | None = None) -> int:
    from evaluation.extract import parse_args

    args = parse_args(build_parser(), argv)
    try:
        cfg = config_from_args(HeatmapConfig, args, FLAG_MAP)
        if args.print_config:
            print_config(cfg)
            return 0
        from sgcl.utils.threads import configure_threads

        configure_threads(workers=0)
        rows = run_heatmap(cfg)
    except (ConfigError, HeatmapError) as exc:
        print(f"sgcl heatmap: error: {exc}", file=sys.stderr)
        return 2
    failed = sum(r["status"] == "failed" for r in rows)
    print(f"sgcl heatmap: {len(rows) - failed} slide(s) drawn, {failed} failed -> {cfg.out_dir}/manifest.csv")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
