"""Slide readers behind one interface; ``open_slide(path, reader="auto")`` picks one.

Adding a reader = one module with a :class:`SlideReader` subclass + one line in ``READERS``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .base import SlideOpenError, SlideReader, SlideReadError, rgba_to_rgb

# name -> "module:Class" (imported on use, so optional dependencies stay optional)
READERS: dict[str, str] = {
    "openslide": "preprocessing.readers.openslide_reader:OpenSlideReader",
    "image": "preprocessing.readers.image_reader:ImageReader",
    "tiatoolbox": "preprocessing.readers.tiatoolbox_reader:TiaToolboxReader",
}
PLAIN_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

__all__ = ["READERS", "SlideOpenError", "SlideReadError", "SlideReader", "open_slide", "reader_class", "rgba_to_rgb"]


def reader_class(name: str) -> type[SlideReader]:
    if name not in READERS:
        raise ValueError(f"unknown reader {name!r}; choose one of {['auto', *READERS]}")
    module, cls = READERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def open_slide(path: str | Path, reader: str = "auto") -> SlideReader:
    """Open ``path`` with ``reader`` (a name from ``READERS``) or, for ``"auto"``: OpenSlide if it
    opens the file, else the plain-image reader for png/jpg/tif, else TIAToolbox when installed.
    Raises :class:`SlideOpenError` naming the file and every reader's reason."""
    path = Path(path)
    if not path.exists():
        raise SlideOpenError(f"{path}: no such file or folder")
    if reader != "auto":
        return reader_class(reader)(path)
    reasons: list[str] = []
    candidates = ["openslide"]
    if path.suffix.lower() in PLAIN_IMAGE_EXTENSIONS:
        candidates.append("image")
    candidates.append("tiatoolbox")
    for name in candidates:
        try:
            return reader_class(name)(path)
        except SlideOpenError as exc:
            reasons.append(f"{name}: {str(exc).removeprefix(str(path) + ': ')}")
    raise SlideOpenError(
        f"{path}: no reader could open this file ({'; '.join(reasons)}). If it is a slide format OpenSlide does not "
        "support (OME-TIFF, JP2), install TIAToolbox (`pip install -e \".[tia]\"`) or convert it to a pyramidal TIFF; "
        "if the file is truncated or corrupt, copy it again."
    )
