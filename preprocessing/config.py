"""Typed config of the tiling stage (``configs/tile/*.yaml``, ``sgcl tile --config``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from sgcl.config import ConfigError, bounded

SLIDE_EXTENSIONS = [
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".dcm",
    ".png", ".jpg", ".jpeg", ".jp2", ".ome.tif", ".ome.tiff",
]


@dataclass
class PatchConfig:
    target_mpp: float = bounded(0.5, gt=0)  # µm/px of the output patches
    patch_size: int = bounded(224, ge=1)  # output patch side in pixels
    stride: Optional[int] = bounded(None, ge=1)  # output pixels between patch origins (None = patch_size, no overlap; larger = gaps)
    edge: Literal["skip", "pad_white", "pad_black"] = "skip"  # cells crossing the right/bottom slide edge: dropped, or kept, outside = 255 / 0


@dataclass
class TissueConfig:
    detection_mpp: float = bounded(8.0, gt=0)  # µm/px of the low-resolution image used for tissue detection
    method: Literal["otsu", "fixed"] = "otsu"
    saturation_threshold: int = bounded(8, ge=0, le=255)  # used when method == "fixed" (0-255 HSV saturation)
    median_blur: int = bounded(7, ge=0)  # odd kernel size on the saturation channel (0 = off; an even size is rounded up)
    close_um: float = bounded(16.0, ge=0)  # morphological closing radius, µm
    min_area_mm2: float = bounded(0.01, ge=0)  # tissue components smaller than this are dropped
    min_hole_area_mm2: float = bounded(0.005, ge=0)  # holes smaller than this are filled
    pen_filter: bool = True          # remove blue/green/black pen ink
    min_tissue_fraction: float = bounded(0.5, ge=0, le=1)  # keep grid cells with at least this tissue fraction
    white_threshold: int = bounded(220, ge=0, le=255)  # after reading: a pixel with min(RGB) above this is background
    black_threshold: int = bounded(25, ge=0, le=255)  # after reading: a pixel with max(RGB) below this is background
    max_background_fraction: float = bounded(0.9, ge=0, le=1)  # drop patches whose background pixel fraction exceeds this (not run with --no-pixels)

    def validate(self) -> None:
        """black_threshold < white_threshold."""
        if self.black_threshold >= self.white_threshold:
            raise ConfigError(f"black_threshold: {self.black_threshold} must be below white_threshold "
                              f"({self.white_threshold})", key="black_threshold")


@dataclass
class OutputConfig:
    codec: Literal["raw", "lzf", "gzip", "jpeg"] = "jpeg"
    store_pixels: bool = True        # false (--no-pixels): coords/grid/tissue fraction only, no `imgs`, no patch pixel read
    jpeg_quality: int = bounded(90, ge=1, le=100)
    gzip_level: int = bounded(4, ge=0, le=9)
    qc: bool = True                  # per-slide QC picture and the cohort index.html
    geojson: bool = True             # per-slide tissue outlines (level-0 px, QuPath annotations); TRIDENT layout: contours_geojson/
    layout: Literal["default", "trident", "clam"] = "default"  # output folders and names: ours, TRIDENT's job folder or CLAM's save_dir (docs/tiling.md)
    flat_warn_fraction: float = bounded(0.5, ge=0, le=1)  # warn per slide when at least this fraction of its kept patches is flat (≥ 90 % of pixels one colour); 1 = warn only when all are


@dataclass
class TileConfig:
    inputs: list[str] = field(default_factory=list)  # slide files, folders or slide-list CSVs (ours, TRIDENT's, CLAM's) with per-slide overrides
    slide_dir: Optional[str] = None  # folder that CSV slide names are relative to (TRIDENT `wsi`, CLAM `slide_id`); default: the CSV's folder
    slide_ext: Optional[str] = None  # extension appended to CLAM `slide_id`s without one, e.g. .svs
    out_dir: str = "outputs/tiles"
    reader: Literal["auto", "openslide", "image", "tiatoolbox"] = "auto"
    assume_mpp: Optional[float] = bounded(None, gt=0)  # µm/px for slides whose header has none (a CSV `mpp` column wins)
    recursive: bool = False
    workers: int = bounded(1, ge=0)  # slides tiled in parallel, one process each (0 = in this process)
    shard: str = "0/1"               # i/n: process the i-th of n interleaved shards (cluster array jobs)
    overwrite: bool = False          # redo slides even when done with the same parameters
    slide_timeout_s: Optional[float] = bounded(None, gt=0)  # a slide still running after this many seconds is killed and marked failed
    roi: Optional[str] = None        # GeoJSON file, or folder of `<slide_id>.geojson`: tile only inside its polygons
    roi_exclude_class: str = "exclude"  # ROI features of this class (case-insensitive) are cut out
    patch: PatchConfig = field(default_factory=PatchConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
