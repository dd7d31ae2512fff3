"""Where the patches of one slide come from, for feature export.

- :class:`StoredPatches`: an ``sgcl tile`` patch file whose ``imgs`` hold the pixels.
- :class:`SlidePatches`: coordinates only (a CLAM/TRIDENT ``patches/<slide>.h5`` with ``coords``, or
  our file without ``imgs``): each patch is read on the fly from the slide at its level-0 ``(x, y)``,
  with the recorded level-0 size, at the best pyramid level, and resized to the patch size.

Both are picklable map-style datasets (``__getitem__(i) -> (P, P, 3) uint8``) that open their file
or slide lazily in each DataLoader worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import h5py
import numpy as np

from preprocessing.h5format import PatchFile

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".svslide", ".dcm", ".png", ".jpg")


class SourceError(ValueError):
    """A feature-export input that cannot be read (the message names the file and the fix)."""


def _decode(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def h5_attrs(path: Path) -> tuple[dict, dict]:
    """(file attrs, coords attrs) of an HDF5 patch/coords file."""
    with h5py.File(path, "r") as f:
        if "coords" not in f:
            raise SourceError(f"{path}: no `coords` dataset (found {sorted(f.keys())}); "
                              "pass an `sgcl tile` patch file or a CLAM/TRIDENT coords file")
        return ({k: _decode(v) for k, v in f.attrs.items()}, {k: _decode(v) for k, v in f["coords"].attrs.items()})


def slide_id_of(path: Path, attrs: dict) -> str:
    sid = attrs.get("slide_id") or path.stem
    return str(sid)[: -len("_patches")] if str(sid).endswith("_patches") else str(sid)


def count_patches(path: Path) -> int:
    with h5py.File(path, "r") as f:
        return int(f["coords"].shape[0]) if "coords" in f else 0


def open_reader(path: str | Path):
    """A slide reader with ``read_region(x0, y0, level, w, h) -> RGB uint8`` and ``level_downsamples``:
    the tiling stage's readers (``preprocessing.readers``)."""
    try:
        from preprocessing.readers import open_slide
    except ImportError:  # TEMPORARY until branch tile-core (slide readers) is merged
        return _OpenSlideAdapter(path)
    return open_slide(str(path))


class _OpenSlideAdapter:
    def __init__(self, path):
        import openslide

        self.slide = openslide.OpenSlide(str(path))
        self.level_downsamples = list(self.slide.level_downsamples)

    def read_region(self, x0, y0, level, w, h):
        return np.asarray(self.slide.read_region((x0, y0), level, (w, h)).convert("RGB"))


def reader_downsamples(reader) -> list[float]:
    for name in ("level_downsamples", "downsamples"):
        value = getattr(reader, name, None)
        if value is not None:
            return [float(v) for v in value]
    return [1.0]


def best_level(downsamples: Sequence[float], wanted: float, tol: float = 0.01) -> int:
    """The coarsest level whose downsample does not exceed ``wanted`` (never upsamples needlessly)."""
    best = 0
    for i, ds in enumerate(downsamples):
        if ds <= wanted * (1 + tol) and ds >= downsamples[best]:
            best = i
    return best


class StoredPatches:
    """The stored pixels of an ``sgcl tile`` patch file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = PatchFile(self.path)
        self.n = len(self.file)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return self.file.read(i)

    def describe(self) -> dict:
        return {"read_mode": "stored", "patch_size": self.file.patch_size}


@dataclass
class SlideGeometry:
    level: int               # pyramid level read
    read_size: int           # pixels read at that level
    patch_size: int          # output side (after resize)
    patch_size_level0: float


class SlidePatches:
    """Patches read on the fly from a slide at recorded level-0 coordinates."""

    def __init__(self, slide_path: Path, coords: np.ndarray, patch_size: int, patch_size_level0: float,
                 level: int | None = None):
        self.slide_path = Path(slide_path)
        if not self.slide_path.is_file() and not self.slide_path.is_dir():
            raise SourceError(f"slide {self.slide_path} does not exist; pass slide_dir= pointing at the slides")
        self.coords = np.asarray(coords, dtype=np.int64)
        reader = open_reader(self.slide_path)
        ds = reader_downsamples(reader)
        if level is None:
            level = best_level(ds, patch_size_level0 / patch_size)
        if not 0 <= level < len(ds):
            raise SourceError(f"{self.slide_path}: level {level} does not exist (the slide has {len(ds)} levels)")
        self.geometry = SlideGeometry(level, int(round(patch_size_level0 / ds[level])), int(patch_size), float(patch_size_level0))
        self._reader, self._pid = reader, os.getpid()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_reader"], state["_pid"] = None, None
        return state

    def _get_reader(self):
        if self._reader is None or self._pid != os.getpid():
            self._reader, self._pid = open_reader(self.slide_path), os.getpid()
        return self._reader

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> np.ndarray:
        g = self.geometry
        x, y = (int(v) for v in self.coords[i])
        img = np.asarray(self._get_reader().read_region(x, y, g.level, g.read_size, g.read_size))[..., :3]
        if img.shape[0] != g.patch_size or img.shape[1] != g.patch_size:
            img = cv2.resize(img, (g.patch_size, g.patch_size), interpolation=cv2.INTER_AREA
                             if img.shape[0] > g.patch_size else cv2.INTER_LINEAR)
        return np.ascontiguousarray(img, dtype=np.uint8)

    def describe(self) -> dict:
        g = self.geometry
        return {"read_mode": "slide", "slide_path": str(self.slide_path), "read_level": g.level,
                "read_size": g.read_size, "patch_size": g.patch_size, "patch_size_level0": g.patch_size_level0}


def find_slide(slide_id: str, attrs: dict, slide_dirs: Sequence[str]) -> Path:
    """The slide of a coords file: ``slide_dir/<slide_id>.<ext>`` first, then the file's ``slide_path`` attr."""
    for d in slide_dirs:
        for suffix in SLIDE_SUFFIXES:
            cand = Path(d) / f"{slide_id}{suffix}"
            if cand.exists():
                return cand
        matches = sorted(Path(d).glob(f"{slide_id}.*"))
        if matches:
            return matches[0]
    recorded = attrs.get("slide_path") or attrs.get("source_path") or attrs.get("slide")
    if recorded and Path(str(recorded)).exists():
        return Path(str(recorded))
    raise SourceError(f"slide for {slide_id!r} not found in {list(slide_dirs) or 'no slide_dir'}"
                      + (f" nor at the recorded path {recorded}" if recorded else "")
                      + "; pass slide_dir=<folder with the slides>")


def open_source(path: Path, slide_dirs: Sequence[str] = (), read_from: str = "auto", patch_size: int | None = None):
    """The patch dataset of one h5 input: stored pixels when present (unless ``read_from='slide'``),
    else the slide read at the recorded coordinates."""
    attrs, cattrs = h5_attrs(path)
    with h5py.File(path, "r") as f:
        has_imgs = "imgs" in f
    if read_from not in ("auto", "stored", "slide"):
        raise SourceError(f"read_from must be auto, stored or slide, not {read_from!r}")
    if has_imgs and read_from in ("auto", "stored"):
        return StoredPatches(path)
    if read_from == "stored":
        raise SourceError(f"{path}: has no stored patches (`imgs`); use read_from=slide with slide_dir=")
    sid = slide_id_of(path, attrs)
    slide = find_slide(sid, {**cattrs, **attrs}, slide_dirs)
    with h5py.File(path, "r") as f:
        coords = f["coords"][:]
        stored_size = int(f["imgs"].shape[1]) if has_imgs and f["imgs"].ndim == 4 else None
    level0 = cattrs.get("patch_size_level0") or attrs.get("patch_size_level0")
    if level0 is None:
        # CLAM: patch_size pixels at patch_level, whose downsample is recorded (or read from the slide)
        if "patch_size" not in cattrs:
            raise SourceError(f"{path}: coords attrs name no patch size (patch_size_level0 or patch_size + patch_level)")
        lvl = int(cattrs.get("patch_level", 0))
        ds = cattrs.get("downsample")
        if ds is None:
            ds = reader_downsamples(open_reader(slide))[lvl]
        ds = float(np.atleast_1d(ds)[0])
        level0 = float(cattrs["patch_size"]) * ds
    out = int(patch_size or stored_size or attrs.get("patch_size") or cattrs.get("patch_size") or 224)
    return SlidePatches(slide, coords, out, float(level0))


def discover_inputs(inputs: Sequence[str]) -> list[Path]:
    """HDF5 files from files, folders (``*.h5``, sorted) and text/CSV lists (one path per line or a
    ``path`` column)."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += sorted(q for q in p.glob("*.h5") if not q.name.startswith("."))
        elif p.suffix in (".csv", ".txt"):
            import pandas as pd

            if p.suffix == ".csv":
                df = pd.read_csv(p)
                col = "path" if "path" in df.columns else df.columns[0]
                found += [Path(v) if Path(v).is_absolute() else p.parent / v for v in df[col].astype(str)]
            else:
                found += [Path(line.strip()) for line in p.read_text().splitlines() if line.strip()]
        elif p.is_file():
            found.append(p)
        else:
            raise SourceError(f"input {p} does not exist; pass patch/coords .h5 files, folders of them, or a CSV list")
    if not found:
        raise SourceError(f"no .h5 inputs found in {list(inputs)}; run `sgcl tile` first or pass CLAM coords files")
    return found
