"""Where each artefact of a slide goes: our layout, TRIDENT's job folder or CLAM's ``save_dir``.

Tiling (:class:`Layout`, config ``output.layout``, ``sgcl tile --layout``), for a slide ``S``:

=============  =====================  ==================================================  =============================
artefact       ``default``            ``trident``                                         ``clam``
=============  =====================  ==================================================  =============================
patch file     ``patches/S.h5``       ``<mag>x_<size>px_<overlap>px_overlap/patches/S_patches.h5``  ``patches/S.h5``
QC picture     ``qc/S.png``           ``contours/S.jpg``                                  ``masks/S.jpg``
stitch         —                      —                                                   ``stitches/S.jpg``
GeoJSON        ``geojson/S.geojson``  ``contours_geojson/S.geojson``                      ``geojson/S.geojson``
slide list     —                      —                                                   ``process_list_autogen.csv``
=============  =====================  ==================================================  =============================

``manifest.csv``, ``index.html`` and ``locks/`` are in the output folder for every layout.

Features (:class:`FeatureLayout`, ``sgcl extract --layout``): ``h5_files/S.h5`` + ``pt_files/S.pt``
(``default``, which is CLAM's layout; ``clam`` is the same) or ``features_<encoder>/S.h5`` (``trident``).
:func:`patch_files_in` finds the patch files of a tiling output folder of any layout, :func:`feature_files_in`
the feature files of a feature folder of any layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .mpp import magnification

LAYOUTS = ("default", "trident", "clam")
FEATURE_LAYOUTS = ("default", "clam", "trident")
TRIDENT_SUFFIX = "_patches"  # TRIDENT names a patch file <slide>_patches.h5
_TRIDENT_JOB = re.compile(r"^[0-9.e+-]+x_\d+px_-?\d+px_overlap$")


class LayoutError(ValueError):
    """A layout name or an output folder that cannot be used; the message says the fix."""


def trident_job_name(target_mpp: float, patch_size: int, stride: int | None) -> str:
    """TRIDENT's ``<mag>x_<size>px_<overlap>px_overlap`` folder for these patch settings: the magnification
    is exact (0.5 µm/px → ``20``, 0.3 µm/px → ``33.3333``), the overlap is ``patch_size - stride`` output px."""
    overlap = int(patch_size) - int(stride if stride is not None else patch_size)
    return f"{magnification(target_mpp):g}x_{int(patch_size)}px_{overlap}px_overlap"


@dataclass(frozen=True)
class Layout:
    """The paths ``sgcl tile`` writes for one layout; one method per artefact."""

    kind: str
    root: Path
    job: str = ""  # trident: the <mag>x_<size>px_<overlap>px_overlap folder inside root

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise LayoutError(f"unknown layout {self.kind!r}; use one of {', '.join(LAYOUTS)}")
        if self.kind == "trident" and not self.job:
            raise LayoutError("the trident layout needs its <mag>x_<size>px_<overlap>px_overlap folder name")
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def for_config(cls, cfg, root: str | Path | None = None) -> "Layout":
        """The layout of a :class:`~preprocessing.config.TileConfig` (``output.layout``, patch settings) in
        ``root`` (default: its ``out_dir``)."""
        kind = cfg.output.layout
        job = trident_job_name(cfg.patch.target_mpp, cfg.patch.patch_size, cfg.patch.stride) if kind == "trident" else ""
        return cls(kind, Path(cfg.out_dir if root is None else root), job)

    @property
    def patches_dir(self) -> Path:
        return self.root / self.job / "patches" if self.kind == "trident" else self.root / "patches"

    def patch_file(self, slide_id: str) -> Path:
        suffix = TRIDENT_SUFFIX if self.kind == "trident" else ""
        return self.patches_dir / f"{slide_id}{suffix}.h5"

    def qc_picture(self, slide_id: str) -> Path:
        """Thumbnail + tissue contour + kept patch grid (CLAM: the mask picture; TRIDENT: the contours picture)."""
        if self.kind == "trident":
            return self.root / "contours" / f"{slide_id}.jpg"
        if self.kind == "clam":
            return self.root / "masks" / f"{slide_id}.jpg"
        return self.root / "qc" / f"{slide_id}.png"

    def stitch(self, slide_id: str) -> Path | None:
        """CLAM's stitch picture (the kept patches on black), or None in the other layouts."""
        return self.root / "stitches" / f"{slide_id}.jpg" if self.kind == "clam" else None

    def geojson_path(self, slide_id: str) -> Path:
        """The slide's tissue contours as GeoJSON (TRIDENT's ``contours_geojson/`` in the trident layout)."""
        folder = "contours_geojson" if self.kind == "trident" else "geojson"
        return self.root / folder / f"{slide_id}.geojson"

    def process_list(self) -> Path | None:
        """CLAM's ``process_list_autogen.csv`` (clam layout only)."""
        return self.root / "process_list_autogen.csv" if self.kind == "clam" else None

    def folders(self) -> list[Path]:
        """The per-slide folders a run creates (and clears of temporaries left by killed runs)."""
        probe = "_"
        folders = [self.patches_dir, self.qc_picture(probe).parent, self.geojson_path(probe).parent]
        stitch = self.stitch(probe)
        return folders + ([stitch.parent] if stitch is not None else [])

    def relative(self, path: Path) -> str:
        """``path`` relative to the output folder (links in ``manifest.csv`` and ``index.html``)."""
        return Path(path).relative_to(self.root).as_posix()


def slide_id_from_file_name(path: Path) -> str:
    """Slide id of a patch or feature file from its name: ``S.h5`` and TRIDENT's ``S_patches.h5`` → ``S``."""
    stem = Path(path).stem
    return stem[: -len(TRIDENT_SUFFIX)] if stem.endswith(TRIDENT_SUFFIX) and len(stem) > len(TRIDENT_SUFFIX) else stem


def h5_files_in(folder: Path, ext: str = ".h5") -> list[Path]:
    """A folder's own ``*<ext>`` files (``*.h5`` by default), sorted, hidden files left out."""
    return sorted(p for p in folder.glob(f"*{ext}") if p.is_file() and not p.name.startswith("."))


def feature_files_in(folder: Path, exts: Sequence[str] = (".h5", ".pt")) -> list[Path]:
    """The feature files (``exts``) of a feature folder of any layout, one rule for every reader:
    ``folder``'s own files if it has any, else those of its ``h5_files/`` + ``pt_files/`` (ours, CLAM's),
    else those of its one ``features_<encoder>/`` (TRIDENT's; several are an error naming them)."""
    folder = Path(folder)
    own = [p for ext in exts for p in h5_files_in(folder, ext)]
    if own:
        return sorted(own)
    subs = [folder / name for name in ("h5_files", "pt_files") if (folder / name).is_dir()]
    if not subs:
        subs = sorted(p for p in folder.glob("features_*") if p.is_dir())
        if len(subs) > 1:
            raise LayoutError(f"{folder} holds several TRIDENT feature folders ({', '.join(p.name for p in subs)}); "
                              "pass the one to use")
    return sorted(p for sub in subs for ext in exts for p in h5_files_in(sub, ext))


def patch_files_in(folder: Path) -> list[Path]:
    """The patch files of a tiling output of any layout: ``folder``'s own ``*.h5`` if it has any, else
    those of its ``patches/`` (ours, CLAM's) or of its one ``<mag>x_<size>px_<overlap>px_overlap/patches/``
    (a TRIDENT job folder). Several patch folders are an error naming them."""
    folder = Path(folder)
    own = h5_files_in(folder)
    if own:
        return own
    found = [folder / "patches"] if (folder / "patches").is_dir() else []
    found += sorted(p / "patches" for p in folder.iterdir()
                    if p.is_dir() and _TRIDENT_JOB.match(p.name) and (p / "patches").is_dir())
    if len(found) > 1:
        raise LayoutError(f"{folder} holds several patch folders ({', '.join(str(p) for p in found)}); "
                          "pass the one to use")
    return h5_files_in(found[0]) if found else []


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_") or "encoder"


@dataclass(frozen=True)
class FeatureLayout:
    """The paths ``sgcl extract`` writes: CLAM's ``h5_files/`` + ``pt_files/`` or TRIDENT's ``features_<encoder>/``."""

    kind: str
    root: Path
    encoder: str = ""  # names TRIDENT's features_<encoder> folder

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_LAYOUTS:
            raise LayoutError(f"unknown features layout {self.kind!r}; use one of {', '.join(FEATURE_LAYOUTS)}")
        object.__setattr__(self, "root", Path(self.root))

    @property
    def features_dir(self) -> Path:
        if self.kind == "trident":
            return self.root / f"features_{_safe_name(self.encoder)}"
        return self.root / "h5_files"

    def h5(self, slide_id: str) -> Path:
        return self.features_dir / f"{slide_id}.h5"

    def pt(self, slide_id: str) -> Path | None:
        """``pt_files/<slide>.pt`` (the features tensor CLAM's MIL loader reads), None in TRIDENT's layout."""
        return None if self.kind == "trident" else self.root / "pt_files" / f"{slide_id}.pt"

    def folders(self) -> list[Path]:
        return [self.features_dir] + ([] if self.kind == "trident" else [self.root / "pt_files"])
