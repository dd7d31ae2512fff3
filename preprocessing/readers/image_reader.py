"""Plain images (png, jpg, single-level tif) as a slide, with a virtual 2× pyramid for low-res reads.

The whole image is decoded once (plain images are small compared to WSIs); levels 1.. are
INTER_AREA reductions built on first use. Resolution tags (TIFF resolution, PNG/JPEG dpi) are
exposed as ``tiff.XResolution``/``tiff.YResolution``/``tiff.ResolutionUnit`` like OpenSlide does.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .base import Background, SlideOpenError, SlideReader, rgba_to_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MIN_LEVEL_SIDE = 256


def _load_tiff(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        arr = page.asarray()
        props: dict[str, str] = {}
        tags = page.tags
        if "XResolution" in tags and "ResolutionUnit" in tags:
            unit = {2: "inch", 3: "centimeter"}.get(int(tags["ResolutionUnit"].value), "none")
            for axis in ("X", "Y"):
                num, den = tags[f"{axis}Resolution"].value
                if den:
                    props[f"tiff.{axis}Resolution"] = repr(num / den)
            props["tiff.ResolutionUnit"] = unit
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):  # planar (C, H, W)
        arr = np.moveaxis(arr, 0, -1)
    return arr, props


def _load_pil(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # slides are large by nature; memory is the limit, not a bomb guard
    with Image.open(path) as img:
        props: dict[str, str] = {}
        dpi = img.info.get("dpi")
        if dpi and dpi[0] and dpi[1]:
            props.update({"tiff.XResolution": repr(float(dpi[0])), "tiff.YResolution": repr(float(dpi[1])),
                          "tiff.ResolutionUnit": "inch"})
        mode = "RGBA" if ("A" in img.mode or "transparency" in img.info) else "RGB"
        arr = np.asarray(img.convert(mode))
    return arr, props


class ImageReader(SlideReader):
    name = "image"

    def __init__(self, path: str | Path):
        super().__init__(path)
        if not self.path.is_file():
            raise SlideOpenError(f"{self.path}: no such file")
        try:
            if self.path.suffix.lower() in (".tif", ".tiff"):
                arr, props = _load_tiff(self.path)
            else:
                arr, props = _load_pil(self.path)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is "cannot open"
            raise SlideOpenError(f"{self.path}: cannot decode as an image ({type(exc).__name__}: {exc})") from exc
        if arr.dtype != np.uint8:
            if arr.dtype == np.uint16:
                arr = (arr >> 8).astype(np.uint8)
            else:
                raise SlideOpenError(f"{self.path}: unsupported pixel type {arr.dtype}; convert it to 8-bit RGB")
        if arr.ndim == 2:
            arr = arr[..., None]
        self._levels: list[np.ndarray | None] = [rgba_to_rgb(arr)]
        h, w = self._levels[0].shape[:2]
        dims, ds = [(w, h)], [1.0]
        while min(dims[-1]) // 2 >= MIN_LEVEL_SIDE:
            pw, ph = dims[-1]
            dims.append((pw // 2, ph // 2))
            ds.append(float(2 ** (len(ds))))
            self._levels.append(None)
        self._dims, self._ds = tuple(dims), tuple(ds)
        self._props = {"openslide.vendor": "image", **props}

    @property
    def vendor(self) -> str:
        return "image"

    def _level(self, level: int) -> np.ndarray:
        if self._levels[level] is None:
            prev = self._level(level - 1)
            w, h = self._dims[level]
            self._levels[level] = cv2.resize(prev, (w, h), interpolation=cv2.INTER_AREA)
        return self._levels[level]  # type: ignore[return-value]

    def read_region(self, x0: int, y0: int, level: int, w: int, h: int, background: Background = "white") -> np.ndarray:
        img = self._level(level)
        ds = self._ds[level]
        lx, ly = int(x0 // ds), int(y0 // ds)
        out = np.full((int(h), int(w), 3), 0 if background == "black" else 255, np.uint8)  # outside the image
        lh, lw = img.shape[:2]
        sx0, sy0 = max(lx, 0), max(ly, 0)
        sx1, sy1 = min(lx + w, lw), min(ly + h, lh)
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - ly:sy1 - ly, sx0 - lx:sx1 - lx] = img[sy0:sy1, sx0:sx1]
        return out

    def close(self) -> None:
        self._levels = [None] * len(self._levels)
