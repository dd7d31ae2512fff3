"""The per-slide patch file: ``<out>/patches/<slide_id>.h5`` (format documented in docs/formats.md).

Datasets
- ``imgs``: the patches, either ``(N, P, P, 3) uint8`` (codec ``raw``/``lzf``/``gzip``) or
  ``(N,)`` variable-length uint8 JPEG bytes (codec ``jpeg``); its attrs say which. Absent in a
  coordinates-only file (``sgcl tile --no-pixels``): its patches are read from the slide
  (``evaluation.sources.open_source``).
- ``coords``: ``(N, 2) int64`` level-0 top-left ``(x, y)``; carries CLAM/TRIDENT attrs.
- ``grid``: ``(N, 2) int32`` ``(column, row)`` on the patch grid.
- ``tissue_fraction``: ``(N,) float32``.

This module is the one place that writes and reads that layout; the tiler, the pretraining
dataset and the feature exporter all go through it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import cv2
import h5py
import numpy as np

from sgcl.utils.atomic import ensure_free_space

FORMAT_NAME = "sgcl-patches"
FORMAT_VERSION = 1
Codec = Literal["raw", "lzf", "gzip", "jpeg"]
CODECS: tuple[str, ...] = ("raw", "lzf", "gzip", "jpeg")
REQUIRED_DATASETS = ("coords", "grid", "tissue_fraction")  # + ``imgs`` unless coordinates only


class PatchFileError(ValueError):
    """An HDF5 file that is not a valid sgcl patch file."""


def encode_jpeg(patch: np.ndarray, quality: int) -> np.ndarray:
    """RGB uint8 (P, P, 3) -> JPEG bytes as a 1-D uint8 array."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(patch, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.reshape(-1)


def decode_jpeg(buf: np.ndarray) -> np.ndarray:
    img = cv2.imdecode(np.asarray(buf, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise PatchFileError("corrupt JPEG patch")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class PatchWriter:
    """Streams patches into a new patch file.

    Rows are appended in batches (``append``); datasets grow with ``maxshape=None`` so peak
    memory is one batch, whatever the slide size. ``codec=None`` writes a coordinates-only file
    (no ``imgs``; ``append`` takes ``imgs=None``).
    """

    def __init__(self, path: str | Path, patch_size: int, codec: Codec | None = "raw", quality: int = 90,
                 gzip_level: int = 4, chunk_rows: int | None = None):
        if codec is not None and codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; choose one of {CODECS}")
        self.path = Path(path)
        self.codec = codec
        self.patch_size = int(patch_size)
        self.n = 0
        self.file = h5py.File(self.path, "w")
        p = self.patch_size
        self.imgs = None
        if codec is None:
            pass
        elif codec == "jpeg":
            self.imgs = self.file.create_dataset(
                "imgs", shape=(0,), maxshape=(None,), dtype=h5py.vlen_dtype(np.uint8), chunks=(chunk_rows or 64,)
            )
            self.imgs.attrs["quality"] = int(quality)
        else:
            compression = {"raw": None, "lzf": "lzf", "gzip": "gzip"}[codec]
            opts = {"compression_opts": gzip_level} if codec == "gzip" else {}
            self.imgs = self.file.create_dataset(
                "imgs", shape=(0, p, p, 3), maxshape=(None, p, p, 3), dtype=np.uint8,
                chunks=(chunk_rows or 1, p, p, 3), compression=compression, **opts,
            )
        if self.imgs is not None:
            self.imgs.attrs["codec"] = codec
        self.coords = self.file.create_dataset("coords", shape=(0, 2), maxshape=(None, 2), dtype=np.int64, chunks=(4096, 2))
        self.grid = self.file.create_dataset("grid", shape=(0, 2), maxshape=(None, 2), dtype=np.int32, chunks=(4096, 2))
        self.tissue = self.file.create_dataset("tissue_fraction", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(4096,))
        self.quality = int(quality)

    def append(self, imgs: np.ndarray | None, coords: np.ndarray, grid: np.ndarray, tissue_fraction: np.ndarray) -> None:
        k = len(coords)
        if k == 0:
            return
        if (imgs is None) != (self.imgs is None):
            raise ValueError("pass imgs exactly when the file stores pixels (codec is not None)")
        if not (len(grid) == len(tissue_fraction) == k and (imgs is None or len(imgs) == k)):
            raise ValueError("imgs, coords, grid and tissue_fraction must have the same length")
        ensure_free_space(self.path.parent, (0 if imgs is None else imgs.nbytes) + 24 * k)  # before HDF5 hits a full disk
        start, stop = self.n, self.n + k
        for ds in (self.imgs, self.coords, self.grid, self.tissue):
            if ds is not None:
                ds.resize(stop, axis=0)
        if imgs is None:
            pass
        elif self.codec == "jpeg":
            encoded = np.empty(k, dtype=object)
            for i, patch in enumerate(imgs):
                encoded[i] = encode_jpeg(patch, self.quality)
            if len({len(e) for e in encoded}) == 1:
                # h5py reads an object array of equal-length buffers as 2-D: write row by row
                for i, e in enumerate(encoded):
                    self.imgs[start + i] = e
            else:
                self.imgs[start:stop] = encoded
        else:
            self.imgs[start:stop] = np.asarray(imgs, dtype=np.uint8)
        self.coords[start:stop] = np.asarray(coords, dtype=np.int64)
        self.grid[start:stop] = np.asarray(grid, dtype=np.int32)
        self.tissue[start:stop] = np.asarray(tissue_fraction, dtype=np.float32)
        self.n = stop

    def set_attrs(self, attrs: Mapping[str, Any], coords_attrs: Mapping[str, Any] | None = None) -> None:
        self.file.attrs["format"] = FORMAT_NAME
        self.file.attrs["format_version"] = FORMAT_VERSION
        for key, value in attrs.items():
            self.file.attrs[key] = _attr_value(value)
        for key, value in (coords_attrs or {}).items():
            self.coords.attrs[key] = _attr_value(value)

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None


def _attr_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (Path, os.PathLike)):
        return str(value)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        return np.array(value, dtype=h5py.string_dtype())
    if isinstance(value, dict):
        import json

        return json.dumps(value, sort_keys=True, default=str)
    return value


def write_patch_file(path: str | Path, imgs: np.ndarray, coords: np.ndarray, grid: np.ndarray,
                     tissue_fraction: np.ndarray | None = None, attrs: Mapping[str, Any] | None = None,
                     coords_attrs: Mapping[str, Any] | None = None, codec: Codec = "raw", quality: int = 90) -> Path:
    """Write a whole patch file at once, atomically (tests and small tools use this)."""
    from sgcl.utils.atomic import atomic_path

    imgs = np.asarray(imgs, dtype=np.uint8)
    if tissue_fraction is None:
        tissue_fraction = np.ones(len(coords), dtype=np.float32)
    with atomic_path(path) as tmp:
        writer = PatchWriter(tmp, patch_size=imgs.shape[1], codec=codec, quality=quality)
        try:
            writer.append(imgs, coords, grid, tissue_fraction)
            writer.set_attrs({"slide_id": Path(path).stem, **(attrs or {})}, coords_attrs)
        finally:
            writer.close()
    return Path(path)


class PatchFile:
    """Read access to one patch file; opens lazily so it can be pickled to DataLoader workers."""

    def __init__(self, path: str | Path, validate: bool = True):
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        if validate:
            self.validate()

    # -- file handle ---------------------------------------------------------------------
    @property
    def file(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            try:
                self._file = h5py.File(self.path, "r")
            except (OSError, FileNotFoundError) as exc:
                raise PatchFileError(f"{self.path}: cannot open as HDF5 ({exc}); re-run `sgcl tile` for this slide") from None
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_file": None, "_pid": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __enter__(self) -> "PatchFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- layout --------------------------------------------------------------------------
    def validate(self) -> None:
        f = self.file
        missing = [name for name in REQUIRED_DATASETS if name not in f]
        if missing:
            raise PatchFileError(
                f"{self.path}: not an sgcl patch file (missing datasets {missing}; found {sorted(f.keys())}). "
                "Create it with `sgcl tile`."
            )
        n = f["coords"].shape[0]
        if f["coords"].ndim != 2 or f["coords"].shape[1] != 2:
            raise PatchFileError(f"{self.path}: coords must be (N, 2), got {f['coords'].shape}")
        for name in ("imgs", "grid", "tissue_fraction"):
            if name in f and f[name].shape[0] != n:
                raise PatchFileError(f"{self.path}: {name} has {f[name].shape[0]} rows but coords has {n}")
        if "imgs" not in f:
            return  # coordinates only
        codec = f["imgs"].attrs.get("codec", "raw")
        if codec not in CODECS:
            raise PatchFileError(f"{self.path}: unknown imgs codec {codec!r}")
        if codec != "jpeg" and (f["imgs"].ndim != 4 or f["imgs"].shape[-1] != 3):
            raise PatchFileError(f"{self.path}: imgs must be (N, P, P, 3) uint8, got {f['imgs'].shape}")

    def __len__(self) -> int:
        return int(self.file["coords"].shape[0])

    @property
    def has_pixels(self) -> bool:
        """False for a coordinates-only file (``sgcl tile --no-pixels``)."""
        return "imgs" in self.file

    @property
    def codec(self) -> str:
        """How ``imgs`` is stored; ``"none"`` for a coordinates-only file."""
        return str(self.file["imgs"].attrs.get("codec", "raw")) if self.has_pixels else "none"

    @property
    def attrs(self) -> dict:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in self.file.attrs.items()}

    @property
    def slide_id(self) -> str:
        return str(self.attrs.get("slide_id", self.path.stem))

    @property
    def patch_size(self) -> int:
        if self.codec not in ("jpeg", "none"):
            return int(self.file["imgs"].shape[1])
        if "patch_size" in self.file.attrs:
            return int(self.file.attrs["patch_size"])
        if len(self) == 0:  # nothing to decode: the coords attrs may still say it, else 0
            return int(self.file["coords"].attrs.get("patch_size", 0))
        return int(decode_jpeg(self._imgs()[0]).shape[0])

    def coords(self) -> np.ndarray:
        return self.file["coords"][:]

    def grid(self) -> np.ndarray:
        return self.file["grid"][:]

    def tissue_fraction(self) -> np.ndarray:
        return self.file["tissue_fraction"][:]

    def _imgs(self) -> h5py.Dataset:
        if not self.has_pixels:
            raise PatchFileError(
                f"{self.path}: coordinates only (tiled with --no-pixels), no stored patches. Read them from the slide "
                "with evaluation.sources.open_source (sgcl pretrain and sgcl extract do), or re-tile without --no-pixels"
            )
        return self.file["imgs"]

    def read(self, index: int) -> np.ndarray:
        """One patch as (P, P, 3) uint8 RGB."""
        data = self._imgs()[int(index)]
        return decode_jpeg(data) if self.codec == "jpeg" else data

    def read_many(self, indices: Iterable[int]) -> np.ndarray:
        """Patches at ``indices`` (any order) as (k, P, P, 3) uint8; contiguous runs are read at once."""
        idx = np.asarray(list(indices), dtype=np.int64)
        if idx.size == 0:
            p = self.patch_size
            return np.zeros((0, p, p, 3), np.uint8)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        ds = self._imgs()
        if self.codec == "jpeg":
            raw = [ds[int(i)] for i in sorted_idx]
            out_sorted = np.stack([decode_jpeg(b) for b in raw])
        else:
            uniq, inverse = np.unique(sorted_idx, return_inverse=True)
            # one slice per contiguous run: h5py fancy indexing is ~50x slower than plain slices
            runs = np.split(uniq, np.nonzero(np.diff(uniq) != 1)[0] + 1)
            out_sorted = np.concatenate([ds[int(r[0]):int(r[-1]) + 1] for r in runs])[inverse]
        out = np.empty_like(out_sorted)
        out[order] = out_sorted
        return out


def is_patch_file(path: str | Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return all(name in f for name in REQUIRED_DATASETS)
    except OSError:
        return False
