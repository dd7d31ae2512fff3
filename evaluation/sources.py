"""Where the patches of one slide come from, for feature export.

- :class:`StoredPatches`: an ``sgcl tile`` patch file whose ``imgs`` hold the pixels.
- :class:`SlidePatches`: coordinates only (CLAM's ``patches/<slide>.h5``, TRIDENT's
  ``<slide>_patches.h5``, or our file without ``imgs``, ``sgcl tile --no-pixels``): each patch is read on
  the fly from the slide at its level-0 ``(x, y)``. Our files are read with the tiler's geometry
  (``read_level``, ``read_size``, the same resize) and edge padding (``edge``: black for ``pad_black``,
  else white); CLAM's coords with theirs (``patch_size`` px at ``patch_level``), TRIDENT's with theirs
  (``patch_size`` px at ``target_magnification``), and outside the slide black, as their OpenSlide
  ``read_region(...).convert("RGB")`` gives.

Both are picklable map-style datasets (``__getitem__(i) -> (P, P, 3) uint8``) that open their file
or slide lazily in each DataLoader worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from preprocessing.h5format import PatchFile
from preprocessing.readers.base import Background

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".svslide", ".dcm", ".png", ".jpg")


class SourceError(ValueError):
    """A feature-export input that cannot be read (the message names the file and the fix)."""


def decode_attr(v: Any) -> Any:
    """An HDF5 attr as a plain Python value (bytes -> str, numpy scalar -> Python scalar)."""
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
        return ({k: decode_attr(v) for k, v in f.attrs.items()}, {k: decode_attr(v) for k, v in f["coords"].attrs.items()})


def slide_id_of(path: Path, attrs: dict) -> str:
    """The file's ``slide_id`` attr (``sgcl tile``), else its name (TRIDENT's ``S_patches.h5`` -> ``S``)."""
    from preprocessing.layouts import slide_id_from_file_name

    return str(attrs.get("slide_id") or slide_id_from_file_name(path))


def count_patches(path: Path) -> int:
    with h5py.File(path, "r") as f:
        return int(f["coords"].shape[0]) if "coords" in f else 0


def open_reader(path: str | Path):
    """The tiling stage's reader for ``path`` (``read_region(x0, y0, level, w, h) -> RGB uint8``)."""
    from preprocessing.readers import open_slide

    return open_slide(str(path))


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

    def __getitems__(self, indices: list[int]) -> list[np.ndarray]:
        """A whole batch at once (DataLoader calls this): contiguous rows are one HDF5 read."""
        return list(self.file.read_many(indices))

    def describe(self) -> dict:
        return {"read_mode": "stored", "patch_size": self.file.patch_size}


@dataclass
class SlideGeometry:
    level: int               # pyramid level read
    read_size: int           # pixels read at that level
    patch_size: int          # output side (after resize)
    patch_size_level0: float
    background: Background = "white"  # what fills pixels outside the slide (preprocessing.readers.base)


class SlidePatches:
    """Patches read on the fly from a slide at recorded level-0 coordinates: ``read_size`` px at
    ``level`` (as recorded by the tiler / CLAM), resized to ``patch_size`` like the tiler does;
    pixels outside the slide are ``background`` (``"white"`` or ``"black"``)."""

    def __init__(self, slide_path: Path, coords: np.ndarray, patch_size: int, patch_size_level0: float,
                 level: int | None = None, read_size: int | None = None, background: Background = "white"):
        self.slide_path = Path(slide_path)
        if not self.slide_path.exists():
            raise SourceError(f"slide {self.slide_path} does not exist; pass slide_dirs=[<folder with the slides>]")
        self.coords = np.asarray(coords, dtype=np.int64)
        reader = open_reader(self.slide_path)
        ds = list(reader.level_downsamples)
        if level is None:
            level = reader.best_level_for_downsample(patch_size_level0 / patch_size)
        if not 0 <= level < len(ds):
            raise SourceError(f"{self.slide_path}: level {level} does not exist (the slide has {len(ds)} levels)")
        if read_size is None:
            read_size = max(1, int(round(patch_size_level0 / ds[level])))
        self.geometry = SlideGeometry(int(level), int(read_size), int(patch_size), float(patch_size_level0), background)
        self._reader, self._pid = reader, os.getpid()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_reader"], state["_pid"] = None, None
        return state

    def _get_reader(self):
        if self._reader is None or self._pid != os.getpid():
            self._reader, self._pid = open_reader(self.slide_path), os.getpid()
        return self._reader

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> np.ndarray:
        from preprocessing.grid import resize_patch

        g = self.geometry
        x, y = (int(v) for v in self.coords[i])
        img = self._get_reader().read_region(x, y, g.level, g.read_size, g.read_size, g.background)
        return np.ascontiguousarray(resize_patch(np.asarray(img)[..., :3], g.patch_size), dtype=np.uint8)

    def describe(self) -> dict:
        g = self.geometry
        desc = {"read_mode": "slide", "slide_path": str(self.slide_path), "read_level": g.level,
                "read_size": g.read_size, "patch_size": g.patch_size, "patch_size_level0": g.patch_size_level0}
        if g.background != "white":  # white was the only fill before: earlier exports keep their hash
            desc["background"] = g.background
        return desc


def find_slide(slide_id: str, attrs: dict, slide_dirs: Sequence[str]) -> Path:
    """The slide of a coords file: ``slide_dir/<slide_id>.<ext>`` first, then the file's ``slide_path`` attr."""
    for d in slide_dirs:
        for suffix in SLIDE_SUFFIXES:
            cand = Path(d) / f"{slide_id}{suffix}"
            if cand.exists():
                return cand
        matches = sorted(q for q in Path(d).glob(f"{slide_id}.*") if q.suffix.lower() not in (".h5", ".csv", ".json", ".pt"))
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
    out = int(patch_size or stored_size or attrs.get("patch_size") or cattrs.get("patch_size") or 224)
    if "read_level" in attrs and "read_size" in attrs:  # an `sgcl tile` file: read exactly what the tiler read
        from preprocessing.grid import edge_background

        level0 = float(attrs.get("patch_size_level0") or cattrs.get("patch_size_level0"))
        return SlidePatches(slide, coords, out, level0, int(attrs["read_level"]), int(attrs["read_size"]),
                            edge_background(str(attrs.get("edge", "skip"))))
    # other tools' coords (CLAM / TRIDENT): OpenSlide + PIL convert("RGB") make the outside black
    if "patch_size" in cattrs and "patch_level" not in cattrs and cattrs.get("target_magnification"):
        # TRIDENT: patch_size px at target_magnification, i.e. patch_size · level0/target magnification level-0 px
        size = int(cattrs["patch_size"])
        level0 = size * float(cattrs["level0_magnification"]) / float(cattrs["target_magnification"])
        return SlidePatches(slide, coords, int(patch_size or stored_size or size), level0, background="black")
    if "patch_size" in cattrs:  # CLAM: patch_size px at patch_level
        level = int(cattrs.get("patch_level", 0))
        read = int(cattrs["patch_size"])
        ds = cattrs.get("downsample")
        ds = float(np.atleast_1d(ds)[0]) if ds is not None else list(open_reader(slide).level_downsamples)[level]
        out = int(patch_size or stored_size or read)
        return SlidePatches(slide, coords, out, float(cattrs.get("patch_size_level0") or read * ds), level, read,
                            background="black")
    level0 = cattrs.get("patch_size_level0") or attrs.get("patch_size_level0")
    if level0 is None:
        raise SourceError(f"{path}: the coords attrs name no patch size (need patch_size [+ patch_level] or "
                          "patch_size_level0); re-create the coords with `sgcl tile` or CLAM")
    return SlidePatches(slide, coords, out, float(level0), background="black")


def discover_inputs(inputs: Sequence[str]) -> list[Path]:
    """HDF5 files from files, folders and text/CSV lists (one path per line or a ``path`` column).

    A folder is a folder of ``*.h5`` or a tiling output of any layout: ours or CLAM's (its ``patches/``)
    or a TRIDENT job folder (its ``<mag>x_<size>px_<overlap>px_overlap/patches/``)."""
    from preprocessing.layouts import LayoutError, patch_files_in

    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            try:
                found += patch_files_in(p)
            except LayoutError as exc:
                raise SourceError(str(exc)) from None
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
        raise SourceError(f"no .h5 inputs found in {list(inputs)} (nor in a patches/ or TRIDENT "
                          "<mag>x_<size>px_<overlap>px_overlap/patches/ folder there); run `sgcl tile` first or "
                          "pass CLAM/TRIDENT coords files")
    return found
