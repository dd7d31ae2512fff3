"""Level-0 µm/px of a slide: from its header, a per-slide override, or ``assume_mpp``.

Priority: per-slide override (the input CSV's ``mpp`` column) > header > ``assume_mpp``. The value
is used exactly as found — never rounded to a nominal magnification (cf. TRIDENT #119) — and
returned with its source (``header:<key>``, ``csv``, ``assume-mpp``).

Header keys, in order: ``openslide.mpp-x/-y`` (OpenSlide fills them for Aperio, Hamamatsu NDPI,
MIRAX, Leica, Ventana, DICOM and generic TIFFs with a resolution), ``aperio.MPP``, the MIRAX
``MICROMETER_PER_PIXEL_X/Y`` keys, ``openslide.mirax.MPP``, then ``tiff.XResolution`` with
``tiff.ResolutionUnit``. ``hamamatsu.XResolution`` is not used: tools disagree on its unit
(TRIDENT reads it as µm/px, others as px/cm), and OpenSlide already derives ``openslide.mpp-x`` for
NDPI from the TIFF resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

# A header value outside this range is not a real slide resolution (e.g. the 72-dpi default that
# many TIFF writers put in, = 352.8 µm/px); it is ignored as if absent.
PLAUSIBLE_MPP = (0.02, 50.0)

# (key for x, key for y or None) in order of trust
_MPP_KEYS: tuple[tuple[str, str | None], ...] = (
    ("openslide.mpp-x", "openslide.mpp-y"),
    ("aperio.MPP", None),
    ("mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X", "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_Y"),
    ("openslide.mirax.MPP", None),
)
_UNIT_UM = {"inch": 25400.0, "centimeter": 10000.0, "cm": 10000.0, "millimeter": 1000.0, "mm": 1000.0,
            "micrometer": 1.0, "um": 1.0}


def magnification(mpp: float) -> float:
    """The magnification that ``mpp`` µm/px corresponds to in CLAM's and TRIDENT's convention
    (10 µm/px ≙ 1×, so 0.5 µm/px = 20×), exact, never rounded to a nominal value."""
    return 10.0 / float(mpp)


class MppError(ValueError):
    """No usable µm/px for a slide."""


@dataclass(frozen=True)
class Mpp:
    value: float      # µm/px used (mean of x and y when both are given)
    source: str       # "header:<key>", "csv" or "assume-mpp"
    x: float
    y: float


def _float(props: Mapping[str, str], key: str | None) -> float | None:
    if key is None or key not in props:
        return None
    try:
        value = float(str(props[key]).strip())
    except ValueError:
        return None
    return value if value > 0 else None


def mpp_from_header(props: Mapping[str, str]) -> tuple[Mpp | None, list[str]]:
    """µm/px from header properties, or ``None``; also the implausible values that were ignored."""
    ignored: list[str] = []
    candidates: list[tuple[float, float, str]] = []
    for kx, ky in _MPP_KEYS:
        x = _float(props, kx)
        if x is not None:
            y = _float(props, ky) or x
            candidates.append((x, y, kx))
    unit = str(props.get("tiff.ResolutionUnit", "")).strip().lower()
    rx, ry = _float(props, "tiff.XResolution"), _float(props, "tiff.YResolution")
    if rx and unit in _UNIT_UM:  # pixels per unit -> µm per pixel
        candidates.append((_UNIT_UM[unit] / rx, _UNIT_UM[unit] / (ry or rx), "tiff.XResolution"))
    for x, y, key in candidates:
        if PLAUSIBLE_MPP[0] <= x <= PLAUSIBLE_MPP[1] and PLAUSIBLE_MPP[0] <= y <= PLAUSIBLE_MPP[1]:
            return Mpp((x + y) / 2, f"header:{key}", x, y), ignored
        ignored.append(f"{key}={x:g} µm/px")
    return None, ignored


def resolve_mpp(slide: str | Path, props: Mapping[str, str], override: float | None = None,
                assume_mpp: float | None = None) -> Mpp:
    """The slide's level-0 µm/px and where it came from; :class:`MppError` names the slide and both fixes."""
    if override is not None:
        if not override > 0:
            raise MppError(f"{slide}: the per-slide mpp override must be > 0, got {override!r}")
        return Mpp(float(override), "csv", float(override), float(override))
    header, ignored = mpp_from_header(props)
    if header is not None:
        return header
    if assume_mpp is not None:
        if not assume_mpp > 0:
            raise MppError(f"assume_mpp must be > 0, got {assume_mpp!r}")
        return Mpp(float(assume_mpp), "assume-mpp", float(assume_mpp), float(assume_mpp))
    found = f" (ignored implausible header values: {', '.join(ignored)})" if ignored else ""
    raise MppError(
        f"{slide}: no µm/px (mpp) in the slide header{found}. Fix it either by adding an `mpp` column for this "
        "slide to the input CSV (columns: path,mpp), or by passing `--assume-mpp VALUE` (config key "
        "`assume_mpp`) for all slides without one, e.g. 0.25 for 40x or 0.5 for 20x scans."
    )
