"""``PatchDataset``: every patch of a cohort of per-slide HDF5 files (``preprocessing/h5format.py``)
under one global index, with the views and metadata of the batch contract (``sgcl/methods/base.py``).

- Sources: a folder (``*.h5``, sorted), a glob, a text file of paths (one per line, ``#`` comments),
  or a list mixing these. Slide order is the sorted path order, so the index is reproducible.
- Metadata (``slide_of``, ``grid_of``, spatial index) comes from the small ``coords``/``grid``
  datasets only; no image is read to build it.
- Coordinates-only files (``sgcl tile --no-pixels``, no ``imgs``) are read from their slide with the
  tiler's geometry (``evaluation.sources.open_source``); the slide is ``<slide_dir>/<slide_id>.<ext>``
  for a folder of ``slide_dirs`` (``data.slide_dirs``), else the file's ``source_path`` attr.
- File handles are opened lazily in the process that reads (each DataLoader worker) and kept in a
  bounded LRU cache (``cache_files``), so a cohort of 10,000 slides never holds 10,000 handles.
- Views are a pure function of ``(seed, epoch, index)``: resumed runs and any worker count give the
  same batches.
"""

from __future__ import annotations

import glob as globlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from preprocessing.h5format import PatchFile, PatchFileError, REQUIRED_DATASETS
from sgcl.methods.base import DatasetMeta
from sgcl.transforms.views import to_tensor


class DatasetError(ValueError):
    """A data source that cannot be used for pretraining (named in the message, with the fix)."""


def resolve_sources(sources: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand folders, globs and ``.txt`` lists into a sorted, de-duplicated list of ``.h5`` files."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    files: list[Path] = []
    for src in sources:
        text = str(src)
        path = Path(text)
        if any(ch in text for ch in "*?["):
            hits = sorted(globlib.glob(text, recursive=True))
            if not hits:
                raise DatasetError(f"the pattern {text} matches no file; check the path given to data.h5_dir/data.files")
            files += [Path(h) for h in hits if Path(h).is_file()]
        elif path.is_dir():
            hits = sorted(p for p in path.rglob("*.h5") if not p.name.startswith("."))
            if not hits:
                raise DatasetError(f"the folder {path} contains no .h5 patch file; run `sgcl tile` first or point data.h5_dir at its patches/ folder")
            files += hits
        elif path.suffix in (".txt", ".lst", ".list") and path.is_file():
            base = path.parent
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    p = Path(line)
                    files.append(p if p.is_absolute() else base / p)
        elif path.is_file():
            files.append(path)
        else:
            raise DatasetError(f"{path} does not exist; pass a folder of .h5 patch files, a glob, a .txt list or .h5 paths")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DatasetError(f"{missing[0]} does not exist ({len(missing)} listed file(s) missing)")
    seen: dict[str, Path] = {}
    for f in files:
        seen.setdefault(str(f.resolve()), f)
    if not seen:
        raise DatasetError(f"no patch file found in {list(map(str, sources))}")
    return sorted(seen.values(), key=lambda p: str(p))


def _read_layout(path: Path) -> tuple[str, np.ndarray, dict | None]:
    """(slide_id, grid (n, 2) int64, file attrs if the file is coordinates only, else None) of one file,
    checking the layout without reading images."""
    try:
        with h5py.File(path, "r") as f:
            missing = [name for name in REQUIRED_DATASETS if name not in f]
            if missing:
                raise DatasetError(f"{path}: not an sgcl patch file (missing dataset(s) {missing}); re-tile it with `sgcl tile`")
            grid, coords = f["grid"], f["coords"]
            if grid.ndim != 2 or grid.shape[1] != 2 or coords.ndim != 2 or coords.shape[1] != 2:
                raise DatasetError(f"{path}: grid/coords must be (N, 2), got {grid.shape}/{coords.shape}; re-tile it with `sgcl tile`")
            n = coords.shape[0]
            n_imgs = f["imgs"].shape[0] if "imgs" in f else n
            if grid.shape[0] != n or n_imgs != n:
                raise DatasetError(f"{path}: imgs/grid/coords row counts differ ({n_imgs}/{grid.shape[0]}/{n}); the file is truncated, re-tile it")
            if "imgs" in f:
                codec = f["imgs"].attrs.get("codec", "raw")
                codec = codec.decode() if isinstance(codec, bytes) else codec
                if codec != "jpeg" and (f["imgs"].ndim != 4 or f["imgs"].shape[-1] != 3):
                    raise DatasetError(f"{path}: imgs must be (N, P, P, 3) uint8, got {f['imgs'].shape}")
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            slide_id = str(attrs.get("slide_id", path.stem))
            return slide_id, np.asarray(grid[:], dtype=np.int64), None if "imgs" in f else attrs
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open as HDF5 ({exc}); the file is corrupt or not HDF5, re-tile it") from None


class PatchDataset(Dataset):
    """All patches of ``sources``; ``transform(patch, rng) -> dict`` makes the views (``SampleTransform``).

    ``skip_bad=True`` drops invalid files (listed in ``bad_files``) and replaces an unreadable patch
    by a neighbouring one of its slide with a warning, instead of stopping; slides without patches
    are always dropped (their ids in ``empty_slides``). ``slide_dirs``: folders holding the slides of coordinates-only files.
    """

    def __init__(self, sources, transform=None, cache_files: int = 64, seed: int = 0, skip_bad: bool = False,
                 slide_dirs: Sequence[str] = ()):
        self.files = resolve_sources(sources)
        self.slide_dirs = [str(d) for d in slide_dirs]
        self.transform = transform
        self.cache_files = max(1, int(cache_files))
        self.seed = int(seed)
        self.skip_bad = bool(skip_bad)
        self.epoch = 0
        self.bad_files: list[tuple[str, str]] = []
        self.empty_slides: list[str] = []  # slide ids of files without patches (left out)
        slide_ids, grids, kept = [], [], []
        for path in self.files:
            try:
                sid, grid, coords_only = _read_layout(path)
                if coords_only is not None and len(grid):
                    self._check_slide(path, sid, coords_only)
            except DatasetError as exc:
                if not skip_bad:
                    raise
                self.bad_files.append((str(path), str(exc)))
                continue
            if len(grid) == 0:
                self.empty_slides.append(sid)
                continue
            kept.append(path)
            slide_ids.append(sid)
            grids.append(grid)
        if not kept:
            raise DatasetError(f"no usable patch in {len(self.files)} file(s) (first: {self.files[0]}); every slide is empty or invalid")
        self.files = kept
        self.slide_ids = slide_ids
        counts = np.array([len(g) for g in grids], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        # int32 grid (4 bytes × 2 per patch: 400 MB at 50M patches, shared copy-on-write by the
        # workers); the int64 tensors of DatasetMeta are made on demand in meta()
        self.grid_of = np.concatenate(grids).astype(np.int32)
        self._cache: OrderedDict[int, PatchFile] = OrderedDict()
        self._pid = os.getpid()

    # -- sizes and metadata --------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_slides(self) -> int:
        return len(self.files)

    def locate(self, index: int) -> tuple[int, int]:
        """(slide index, row in that slide's file) of a global patch index."""
        if not 0 <= index < len(self):
            raise IndexError(f"patch index {index} out of range 0..{len(self) - 1}")
        s = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return s, int(index - self.offsets[s])

    def meta(self, radius: float = 3.0) -> DatasetMeta:
        """``DatasetMeta`` for ``PretrainMethod.on_train_start`` (spatial index of grid radius ``radius``)."""
        counts = np.diff(self.offsets)
        slide_of = torch.from_numpy(np.repeat(np.arange(self.num_slides, dtype=np.int64), counts))
        grid_of = torch.from_numpy(self.grid_of.astype(np.int64))
        neighbors = None
        try:
            from sgcl.data.neighbors import SpatialIndex
        except ImportError:  # the neighbour index ships with the methods
            SpatialIndex = None
        if SpatialIndex is not None:
            neighbors = SpatialIndex(slide_of, grid_of, radius=radius)
        return DatasetMeta(num_patches=len(self), num_slides=self.num_slides, slide_of=slide_of, grid_of=grid_of, neighbors=neighbors)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # -- reading -------------------------------------------------------------------------------
    def _check_slide(self, path: Path, slide_id: str, attrs: dict) -> None:
        """A coordinates-only file must find its slide now, not in a loader worker mid-epoch."""
        from evaluation.sources import SourceError, find_slide

        try:
            find_slide(slide_id, attrs, self.slide_dirs)
        except SourceError as exc:
            raise DatasetError(f"{path}: coordinates only (tiled with --no-pixels), so its patches are read from the "
                               f"slide, but {exc}. Set data.slide_dirs=[<folder with the slides>]") from None

    def _file(self, slide: int):
        """The open reader of a slide's patches: its ``PatchFile``, or for a coordinates-only file the
        ``SlidePatches`` that reads them from the slide."""
        if self._pid != os.getpid():  # forked worker: never reuse the parent's handles
            self._cache = OrderedDict()
            self._pid = os.getpid()
        pf = self._cache.get(slide)
        if pf is not None:
            self._cache.move_to_end(slide)
            return pf
        pf = PatchFile(self.files[slide], validate=False)
        if not pf.has_pixels:
            from evaluation.sources import open_source

            pf.close()
            pf = open_source(self.files[slide], self.slide_dirs)
        self._cache[slide] = pf
        while len(self._cache) > self.cache_files:
            _, old = self._cache.popitem(last=False)
            old.close()
        return pf

    @property
    def open_files(self) -> int:
        return sum(1 for pf in self._cache.values() if getattr(pf, "_file", None) is not None
                   or getattr(pf, "_reader", None) is not None)

    def read_patch(self, index: int, where: tuple[int, int] | None = None) -> np.ndarray:
        """Patch ``index`` as (P, P, 3) uint8 RGB (``where`` = its ``locate`` result, if known)."""
        from evaluation.sources import SourceError
        from preprocessing.readers import SlideOpenError, SlideReadError

        slide, row = where or self.locate(index)
        try:
            src = self._file(slide)
            return src.read(row) if isinstance(src, PatchFile) else src[row]
        except (PatchFileError, OSError, KeyError) as exc:
            raise DatasetError(f"{self.files[slide]}: cannot read patch {row} ({exc}); re-tile this slide") from None
        except (SlideOpenError, SlideReadError, SourceError) as exc:
            raise DatasetError(f"{self.files[slide]}: cannot read patch {row} from its slide ({exc}); check the slide "
                               "file (data.slide_dirs) or re-tile with stored pixels") from None

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        where = self.locate(index)
        try:
            img = self.read_patch(index, where)
        except DatasetError as exc:
            if not self.skip_bad:
                raise
            img = self._replacement(index, where, exc)
        slide = where[0]
        item = {"index": index, "slide": slide, "grid": self.grid_of[index].astype(np.int64)}
        if self.transform is None:
            item["image"] = img
            return item
        rng = np.random.default_rng([self.seed, self.epoch, index])
        item.update(self.transform(img, rng))
        return item

    def _replacement(self, index: int, where: tuple[int, int], exc: Exception) -> np.ndarray:
        """With ``skip_bad``: an unreadable patch is replaced by the next readable one of its slide
        (deterministic), with a warning, so one corrupt patch never stops a cohort."""
        import warnings

        slide, row = where
        start, n = int(self.offsets[slide]), int(self.offsets[slide + 1] - self.offsets[slide])
        warnings.warn(f"{exc}; using a neighbouring patch of the same slide instead", RuntimeWarning, stacklevel=3)
        for k in range(1, min(n, 16)):
            j = start + (row + k) % n
            try:
                return self.read_patch(j, (slide, (row + k) % n))
            except DatasetError:
                continue
        raise exc

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def close(self) -> None:
        for pf in self._cache.values():
            pf.close()
        self._cache.clear()


class SampleTransform:
    """Patch -> the per-sample part of the batch contract: ``views`` (``num_views`` global views),
    ``geoms``, ``local`` (4 quadrant crops) when ``multicrop`` is given, and ``entropy`` (each global
    view's IIE map, float32 (h, w)) when ``guide`` (an ``InfoGuide``, IGU-Aug) is given.

    The guide is computed once per patch from its un-augmented pixels (cached) and rendered through
    each global view's geometry; its adaptive jitter, if any, acts in the builder's photometric.
    ``normalize=False`` keeps uint8 tensors for the GPU augmentation path (``transforms/gpu.py``).
    """

    def __init__(self, builder, num_views: int = 2, multicrop=None, normalize: bool = True, guide=None):
        self.builder = builder
        self.num_views = num_views
        self.multicrop = multicrop
        self.normalize = normalize
        self.guide = guide

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> dict:
        guide = None if self.guide is None else self.guide(img)
        views = self.builder.guided_views(img, rng, self.num_views, guide)
        out = {"views": [to_tensor(v, normalize=self.normalize) for v, _, _ in views],
               "geoms": [torch.from_numpy(g.to_array()) for _, g, _ in views]}
        if guide is not None:
            out["entropy"] = [torch.from_numpy(self.guide.entropy_of(gv)) for _, _, gv in views]
        if self.multicrop is not None:
            local = self.multicrop(img, rng)
            out["local"] = torch.stack([to_tensor(v, normalize=self.normalize) for v, _ in local])
            out["local_geoms"] = torch.stack([torch.from_numpy(g.to_array()) for _, g in local])
        return out


def collate(items: Iterable[dict]) -> dict:
    """Batch dict of the contract: ``views`` list of (B,3,H,W), ``local`` (4B,3,h,w) ordered
    [tl(B), tr(B), bl(B), br(B)], ``geoms`` list of (B, 8), ``entropy`` list of (B, H, W) (IGU-Aug),
    ``index``/``slide`` (B,), ``grid`` (B, 2)."""
    items = list(items)
    batch: dict = {
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        "slide": torch.tensor([it["slide"] for it in items], dtype=torch.int64),
        "grid": torch.from_numpy(np.stack([np.asarray(it["grid"], dtype=np.int64) for it in items])),
    }
    if "views" in items[0]:
        nv = len(items[0]["views"])
        batch["views"] = [torch.stack([it["views"][v] for it in items]) for v in range(nv)]
        batch["geoms"] = [torch.stack([it["geoms"][v] for it in items]) for v in range(nv)]
    if "entropy" in items[0]:
        batch["entropy"] = [torch.stack([it["entropy"][v] for it in items]) for v in range(len(items[0]["entropy"]))]
    if "local" in items[0]:
        local = torch.stack([it["local"] for it in items])  # (B, 4, 3, h, w)
        batch["local"] = local.transpose(0, 1).reshape(-1, *local.shape[2:])
        lg = torch.stack([it["local_geoms"] for it in items])  # (B, 4, 8)
        batch["local_geoms"] = lg.transpose(0, 1).reshape(-1, 8)
    if "image" in items[0]:
        batch["image"] = torch.from_numpy(np.stack([it["image"] for it in items]))
    return batch
