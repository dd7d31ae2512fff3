"""TIAToolbox reader for formats OpenSlide cannot open (OME-TIFF, JP2, …); optional ``[tia]`` extra."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Background, SlideOpenError, SlideReader, SlideReadError, rgba_to_rgb

INSTALL_HINT = ('install the optional TIAToolbox reader in a venv of its own: `.ci/tia_venv.sh`, or `pip install -e ".[tia]"` '
                '(see docs/install.md)')


def tiatoolbox_available() -> bool:
    try:
        import tiatoolbox.wsicore.wsireader  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken install both mean "not available"
        return False
    return True


class TiaToolboxReader(SlideReader):
    name = "tiatoolbox"

    def __init__(self, path: str | Path):
        super().__init__(path)
        if not tiatoolbox_available():
            raise SlideOpenError(f"{self.path}: the TIAToolbox reader is not installed; {INSTALL_HINT}")
        from tiatoolbox.wsicore.wsireader import WSIReader

        try:
            self._reader = WSIReader.open(str(self.path))
            info = self._reader.info
        except Exception as exc:  # noqa: BLE001
            raise SlideOpenError(f"{self.path}: TIAToolbox cannot open it ({type(exc).__name__}: {exc})") from exc
        self._dims = tuple((int(w), int(h)) for w, h in info.level_dimensions)
        self._ds = tuple(float(d) for d in info.level_downsamples)
        props = {str(k): str(v) for k, v in (info.raw or {}).items()} if isinstance(info.raw, dict) else {}
        if info.mpp is not None:
            props["openslide.mpp-x"], props["openslide.mpp-y"] = repr(float(info.mpp[0])), repr(float(info.mpp[1]))
        props["openslide.vendor"] = str(info.vendor or "tiatoolbox")
        self._props = props

    def read_region(self, x0: int, y0: int, level: int, w: int, h: int, background: Background = "white") -> np.ndarray:
        fill = 0 if background == "black" else 255
        try:
            arr = self._reader.read_rect((int(x0), int(y0)), (int(w), int(h)), resolution=int(level), units="level",
                                         pad_mode="constant", pad_constant_values=fill)  # outside = background
        except Exception as exc:  # noqa: BLE001
            raise SlideReadError(f"{self.path}: cannot decode region x={x0} y={y0} level={level} ({exc})") from exc
        return rgba_to_rgb(np.asarray(arr, dtype=np.uint8), background)

    def close(self) -> None:
        self._reader = None
