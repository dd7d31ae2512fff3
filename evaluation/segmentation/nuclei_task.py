"""A small-structure (nuclei) segmentation task built from real H&E images — with DERIVED labels.

The masks are NOT expert annotation. They are derived automatically, per image:
1. colour deconvolution (Ruifrok & Johnston, ``skimage.color.rgb2hed``) → haematoxylin channel, Gaussian-smoothed;
2. Otsu threshold of that channel inside the tissue (pixels darker than ``background_level``);
3. closing, hole filling, opening, removal of objects smaller than ``min_area`` px;
4. splitting of touching nuclei by a watershed on the distance transform (markers = local maxima
   at least ``min_distance`` px apart); a one-pixel background line separates touching instances.
They are good enough to compare encoders and label budgets on a small-structure task (issue #4's
ablation, issue #6's study); they are not a benchmark against pathologists.

Sources: the real H&E images in ``../shared/data/images/he-*`` and tissue-rich regions of the
CMU-1-Small-Region slide (CC0, shipped as ``data/demo/``). Each source is cut into non-overlapping
tiles; tiles are assigned to train/val/test by contiguous bands along the source's longer axis, so no
pixel of a source appears in two splits and val/test tiles come from regions unseen in training.

One call: ``build_nuclei_task(out_dir) -> NucleiTask`` (resumable: a finished task is reused).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from sgcl.utils.atomic import atomic_write_json, atomic_write_text

from .data import read_image
from .overlays import save_mask_png, save_png

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_IMAGE_DIR = REPO_ROOT.parent / "shared" / "data" / "images"
DEFAULT_SLIDE = REPO_ROOT / "data" / "demo" / "CMU-1-Small-Region.svs"
TASK_FILE = "task.json"


@dataclass
class NucleiParams:
    """Parameters of the label derivation (all in pixels of the source image)."""

    sigma: float = 1.5
    background_level: float = 220.0
    min_area: int = 30
    max_hole: int = 200
    open_radius: int = 2
    min_distance: int = 6


@dataclass
class NucleiTask:
    root: Path
    train: Path
    val: Path
    test: Path
    meta: dict = field(default_factory=dict)

    def split_dir(self, split: str) -> Path:
        return {"train": self.train, "val": self.val, "test": self.test}[split]


def derive_nuclei_instances(rgb: np.ndarray, params: NucleiParams | None = None) -> np.ndarray:
    """(H, W) int32 nucleus instance labels (0 = background) of an H&E RGB uint8 image."""
    from scipy import ndimage as ndi
    from skimage import feature, measure, morphology, segmentation
    from skimage.color import rgb2hed
    from skimage.filters import gaussian, threshold_otsu

    p = params or NucleiParams()
    haem = gaussian(rgb2hed(rgb)[..., 0], p.sigma)
    tissue = rgb.mean(-1) < p.background_level
    if tissue.sum() < 100:
        return np.zeros(rgb.shape[:2], np.int32)
    nuclei = haem > threshold_otsu(haem[tissue])
    nuclei &= tissue
    nuclei = morphology.closing(nuclei, morphology.disk(1))
    nuclei = morphology.remove_small_holes(nuclei, max_size=p.max_hole)
    nuclei = morphology.opening(nuclei, morphology.disk(p.open_radius))
    nuclei = morphology.remove_small_objects(nuclei, max_size=p.min_area)
    if not nuclei.any():
        return np.zeros(rgb.shape[:2], np.int32)
    dist = ndi.distance_transform_edt(nuclei)
    peaks = feature.peak_local_max(dist, min_distance=p.min_distance, labels=measure.label(nuclei), exclude_border=False)
    markers = np.zeros(nuclei.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return segmentation.watershed(-dist, markers, mask=nuclei).astype(np.int32)


def instances_to_mask(instances: np.ndarray) -> np.ndarray:
    """Binary class mask (1 = nucleus) with a background line wherever two instances touch."""
    from scipy import ndimage as ndi

    big = np.iinfo(np.int32).max
    inst = instances.astype(np.int32)
    larger = ndi.maximum_filter(inst, size=3)  # >= inst; differs where a higher label touches
    smaller = ndi.minimum_filter(np.where(inst > 0, inst, big), size=3)  # a lower positive label touches
    contact = (inst > 0) & ((larger != inst) | ((smaller != inst) & (smaller != big)))
    return ((inst > 0) & ~contact).astype(np.uint8)


def _slide_regions(slide: Path, region_size: int, count: int, background_level: float) -> list[tuple[str, np.ndarray]]:
    """The ``count`` most tissue-rich non-overlapping level-0 boxes of a slide (grid-aligned)."""
    from .slide_source import open_region_source

    with open_region_source(slide, slide_mpp=1.0) as src:
        w0, h0 = src.level_dims0
        thumb = src.thumbnail(1024)
        lds = w0 / thumb.shape[1]  # level-0 px per thumbnail px
        tissue = thumb.mean(-1) < background_level
        cells = []
        for y in range(0, h0 - region_size + 1, region_size):
            for x in range(0, w0 - region_size + 1, region_size):
                sub = tissue[int(y / lds):int((y + region_size) / lds), int(x / lds):int((x + region_size) / lds)]
                cells.append((float(sub.mean()) if sub.size else 0.0, x, y))
        cells.sort(reverse=True)
        out = []
        for frac, x, y in cells[:count]:
            if frac < 0.5:
                break
            out.append((f"{slide.stem}_x{x}_y{y}", src.read(x, y, 0, region_size, region_size)))
    return out


def _band_splits(n: int, fractions: Sequence[float]) -> list[str]:
    """Split label per band index 0..n-1 (contiguous bands); fewer than 3 bands all go to train."""
    if n < 3:
        return ["train"] * n
    n_val = max(1, int(round(fractions[1] * n)))
    n_test = max(1, int(round(fractions[2] * n)))
    n_train = max(1, n - n_val - n_test)
    n_val = n - n_train - n_test
    return ["train"] * n_train + ["val"] * n_val + ["test"] * n_test


def build_nuclei_task(
    out_dir: str | Path,
    images: Sequence[str | Path] | None = None,
    slide: str | Path | None = DEFAULT_SLIDE,
    slide_regions: int = 3,
    slide_region_size: int = 1024,
    tile_size: int = 256,
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    params: NucleiParams | None = None,
    overwrite: bool = False,
) -> NucleiTask:
    """Build (or reuse) the derived-label nuclei task under ``out_dir``.

    ``images`` defaults to ``../shared/data/images/he-*.png|jpg``; ``slide=None`` or
    ``slide_regions=0`` leaves the slide out. Layout: ``<out>/{train,val,test}/{images,masks,instances}/``
    plus ``task.json`` (sources, parameters, tile counts, foreground fractions) and ``README.md``.
    Returns the split folders, which :func:`evaluation.segmentation.data.discover_splits` reads.
    """
    out = Path(out_dir)
    params = params or NucleiParams()
    if images is None:
        if not DEFAULT_IMAGE_DIR.is_dir():
            raise FileNotFoundError(f"{DEFAULT_IMAGE_DIR} is absent; pass images=[...] (real H&E images)")
        images = sorted(p for p in DEFAULT_IMAGE_DIR.glob("he-*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    images = [Path(p) for p in images]
    for p in images:
        if not p.is_file():
            raise FileNotFoundError(f"nuclei task source image {p} does not exist")
    if slide is not None and slide_regions > 0 and not Path(slide).is_file():
        raise FileNotFoundError(f"nuclei task source slide {slide} does not exist; pass slide=None to leave it out")
    use_slide = slide is not None and slide_regions > 0
    spec = {"images": [str(p.resolve()) for p in images], "slide": str(Path(slide).resolve()) if use_slide else None,
            "slide_regions": slide_regions if use_slide else 0, "slide_region_size": slide_region_size,
            "tile_size": tile_size, "split_fractions": list(split_fractions), "params": asdict(params)}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    task = NucleiTask(out, out / "train", out / "val", out / "test")
    meta_path = out / TASK_FILE
    if meta_path.is_file() and not overwrite:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            task.meta = meta
            return task
        raise FileExistsError(f"{out} holds a nuclei task built with other settings; pass overwrite=True or another out_dir")

    sources: list[tuple[str, np.ndarray]] = [(p.stem, read_image(p)) for p in images]
    if use_slide:
        sources += _slide_regions(Path(slide), slide_region_size, slide_regions, params.background_level)
    counts = {s: 0 for s in ("train", "val", "test")}
    fg = {s: [] for s in counts}
    per_source = []
    for name, rgb in sources:
        instances = derive_nuclei_instances(rgb, params)
        mask = instances_to_mask(instances)
        h, w = mask.shape
        th, tw = (tile_size, tile_size) if min(h, w) >= tile_size else (h, w)
        rows, cols = h // th, w // tw
        along_x = w >= h
        bands = _band_splits(cols if along_x else rows, split_fractions)
        for r in range(rows):
            for c in range(cols):
                split = bands[c if along_x else r]
                ys, xs = slice(r * th, (r + 1) * th), slice(c * tw, (c + 1) * tw)
                tile = f"{name}_r{r}_c{c}"
                save_png(rgb[ys, xs], out / split / "images" / f"{tile}.png")
                save_mask_png(mask[ys, xs], out / split / "masks" / f"{tile}.png")
                save_png(np.clip(instances[ys, xs], 0, 65535).astype(np.uint16), out / split / "instances" / f"{tile}.png")
                counts[split] += 1
                fg[split].append(float(mask[ys, xs].mean()))
        per_source.append({"source": name, "size": [w, h], "tile": [tw, th], "bands": bands,
                           "nuclei": int(instances.max()), "foreground_fraction": round(float(mask.mean()), 4)})
    meta = {"key": key, "task": "nuclei segmentation (2 classes: 0 background, 1 nucleus)",
            "labels": "DERIVED automatically (colour deconvolution, Otsu, morphology, watershed); not expert annotation",
            "spec": spec, "tiles": counts, "sources": per_source,
            "foreground_fraction": {s: (round(float(np.mean(v)), 4) if v else None) for s, v in fg.items()},
            "class_names": ["background", "nucleus"]}
    atomic_write_text(out / "README.md", (__doc__ or "").strip() + "\n")
    atomic_write_json(meta_path, meta)  # written last: marks the task complete
    task.meta = meta
    return task
