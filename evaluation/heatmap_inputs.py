"""What ``sgcl heatmap`` reads: feature files of any layout (their coords and patch footprint), the
slides they belong to, and per-patch scores from a saved file or from a MIL model folder.

Every error is a :class:`~evaluation.heatmap.HeatmapError` naming the file and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np

from evaluation.heatmap import HeatmapError
from evaluation.sources import decode_attr
from preprocessing.layouts import LayoutError, feature_files_in


@dataclass
class FeatureSlide:
    """One slide's feature file: ids, level-0 coords and the patch side in level-0 px."""

    slide_id: str
    path: Path
    coords: np.ndarray                    # (N, 2) int64 level-0 x, y
    size0: float                          # patch side in level-0 px
    attrs: dict = field(default_factory=dict)

    def features(self) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            if "features" not in f:
                raise HeatmapError(f"{self.path}: no `features` dataset (found {sorted(f.keys())}); --model needs "
                                   "a feature file written by `sgcl extract` (or CLAM/TRIDENT)")
            return f["features"][:].astype(np.float32)

    @property
    def patch_file(self) -> Path | None:
        """The patch file the features were extracted from (``source`` attr of ``sgcl extract``), if it exists."""
        src = self.attrs.get("source")
        return Path(str(src)) if src and Path(str(src)).is_file() else None


def feature_files(items: Sequence[str]) -> list[Path]:
    """Feature ``.h5`` files from files and folders (a folder of any layout:
    :func:`preprocessing.layouts.feature_files_in`)."""
    found: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_file():
            found.append(p)
            continue
        if not p.is_dir():
            raise HeatmapError(f"features {p} does not exist; pass a feature .h5 file or a folder of them "
                               "(`sgcl extract --out` folder, its h5_files/, or TRIDENT's features_<encoder>/)")
        try:
            files = feature_files_in(p, exts=(".h5",))
        except LayoutError as exc:
            raise HeatmapError(str(exc)) from None
        if not files:
            raise HeatmapError(f"no feature .h5 files in {p} (nor in its h5_files/ or features_<encoder>/); "
                               "run `sgcl extract` first")
        found += files
    if not found:
        raise HeatmapError("no features: pass --features <feature .h5 files or folders>")
    return found


def patch_size_level0(path: Path, attrs: dict, cattrs: dict, level_downsamples: Sequence[float] | None = None) -> float:
    """The patch side in level-0 px from the coords/file attrs: ``patch_size_level0``; TRIDENT's
    ``patch_size`` at ``target_magnification``; CLAM's ``patch_size`` at ``patch_level`` (its ``downsample``
    attr or the slide's level downsample)."""
    for d in (cattrs, attrs):
        if d.get("patch_size_level0") not in (None, "", 0):
            return float(d["patch_size_level0"])
    if "patch_size" in cattrs and "patch_level" not in cattrs and cattrs.get("target_magnification"):
        return float(cattrs["patch_size"]) * float(cattrs["level0_magnification"]) / float(cattrs["target_magnification"])
    if "patch_size" in cattrs:
        level = int(cattrs.get("patch_level", 0))
        ds = cattrs.get("downsample")
        if ds is not None:
            return float(cattrs["patch_size"]) * float(np.atleast_1d(ds)[0])
        if level == 0:
            return float(cattrs["patch_size"])
        if level_downsamples is not None and level < len(level_downsamples):
            return float(cattrs["patch_size"]) * float(level_downsamples[level])
    raise HeatmapError(f"{path}: its coords attrs give no patch footprint (need patch_size_level0, or patch_size + "
                       "patch_level); write the features with `sgcl extract` from `sgcl tile`, CLAM or TRIDENT coords")


def read_feature_slide(path: Path, downsamples_of: Callable[[str], Sequence[float]] | None = None) -> FeatureSlide:
    """Coords, footprint and attrs of one feature file (features are read only when needed);
    ``downsamples_of(slide_id)`` gives the slide's level downsamples for CLAM coords without a ``downsample`` attr."""
    from preprocessing.layouts import slide_id_from_file_name

    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise HeatmapError(f"{path}: no `coords` dataset (found {sorted(f.keys())}); the heatmap needs each "
                                   "patch's level-0 position: export the features with `sgcl extract`, CLAM or TRIDENT")
            coords = f["coords"][:]
            attrs = {k: decode_attr(v) for k, v in f.attrs.items()}
            cattrs = {k: decode_attr(v) for k, v in f["coords"].attrs.items()}
            if "features" in f and f["features"].shape[0] != coords.shape[0]:
                raise HeatmapError(f"{path}: {f['features'].shape[0]} feature rows but {coords.shape[0]} coords")
    except OSError as exc:
        raise HeatmapError(f"{path}: cannot open as HDF5 ({exc}); export the features again") from None
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise HeatmapError(f"{path}: coords must be (N, 2) level-0 x, y; got shape {coords.shape}")
    sid = str(attrs.get("slide_id") or slide_id_from_file_name(path))
    needs_slide = (not cattrs.get("patch_size_level0") and not attrs.get("patch_size_level0")
                   and int(cattrs.get("patch_level", 0) or 0) > 0 and cattrs.get("downsample") is None)
    size0 = patch_size_level0(path, attrs, cattrs, downsamples_of(sid) if needs_slide and downsamples_of else None)
    return FeatureSlide(sid, path, coords.astype(np.int64), size0, {**cattrs, **attrs})


def slide_index(items: Sequence[str]) -> dict[str, Path]:
    """Slide id -> slide file, from slide files, folders and slide-list CSVs (as ``sgcl tile`` reads them)."""
    from preprocessing.slide_lists import CohortError, discover

    try:
        return {job.slide_id: job.path for job in discover(items)}
    except CohortError as exc:
        raise HeatmapError(f"--slides: {exc}") from None


def find_slide(slide: FeatureSlide, slides: dict[str, Path]) -> Path:
    if slide.slide_id in slides:
        return slides[slide.slide_id]
    raise HeatmapError(f"{slide.path}: no slide {slide.slide_id!r} among --slides ({len(slides)} slides: "
                       f"{', '.join(sorted(slides)[:5])}{' ...' if len(slides) > 5 else ''}); pass the slide file, "
                       "its folder or a CSV listing it")


# -- scores ---------------------------------------------------------------------------------------
def _align(src_coords: np.ndarray, values: dict[str, np.ndarray], slide: FeatureSlide, where: Path) -> dict[str, np.ndarray]:
    """``values`` (rows at ``src_coords``) reordered to ``slide.coords``; every patch must have a score."""
    index = {(int(x), int(y)): i for i, (x, y) in enumerate(np.asarray(src_coords).reshape(-1, 2).tolist())}
    rows = np.array([index.get((int(x), int(y)), -1) for x, y in slide.coords.tolist()], np.int64)
    missing = int((rows < 0).sum())
    if missing:
        raise HeatmapError(f"{where}: {missing} of the {len(rows)} patches of {slide.path} have no score at their "
                           "coords; write the scores for the same patches (same level-0 x, y)")
    return {k: np.asarray(v, np.float32)[rows] for k, v in values.items()}


def _check_length(values: dict[str, np.ndarray], slide: FeatureSlide, where: Path) -> dict[str, np.ndarray]:
    n = len(slide.coords)
    for name, v in values.items():
        if v.ndim != 1 or len(v) != n:
            raise HeatmapError(f"{where}: score {name!r} has shape {v.shape} but {slide.path} has {n} patches; give "
                               "one score per patch, in the feature file's order (or add coords / x,y columns)")
    return {k: v.astype(np.float32) for k, v in values.items()}


def read_scores_file(path: Path, slide: FeatureSlide) -> dict[str, np.ndarray]:
    """Scores of ``slide`` from an h5 (``scores`` dataset or group; matched by ``coords`` when it has them,
    else by order) or a CSV (``x``, ``y`` and one column per score)."""
    if path.suffix.lower() == ".csv":
        import pandas as pd

        try:
            table = pd.read_csv(path)
        except Exception as exc:  # pandas raises several types
            raise HeatmapError(f"{path}: cannot read the scores CSV ({exc})") from None
        cols = [c for c in table.columns if c not in ("x", "y", "slide_id")]
        if "x" not in table.columns or "y" not in table.columns or not cols:
            raise HeatmapError(f"{path}: a scores CSV needs columns x, y (level-0 px) and one or more score columns "
                               f"(e.g. score); found {list(table.columns)}")
        if "slide_id" in table.columns:
            table = table[table["slide_id"].astype(str) == slide.slide_id]
        try:
            values = {str(c): table[c].to_numpy(np.float32) for c in cols}
        except (ValueError, TypeError):
            raise HeatmapError(f"{path}: score columns {cols} must be numbers") from None
        return _align(table[["x", "y"]].to_numpy(), values, slide, path)
    try:
        with h5py.File(path, "r") as f:
            if "scores" not in f:
                raise HeatmapError(f"{path}: no `scores` dataset or group (found {sorted(f.keys())}); write the "
                                   "per-patch scores as `scores` (N,) or `scores/<name>` (N,)")
            node = f["scores"]
            values = ({"score": node[:]} if isinstance(node, h5py.Dataset)
                      else {k: node[k][:] for k in node if isinstance(node[k], h5py.Dataset)})
            src = f["coords"][:] if "coords" in f else None
    except OSError as exc:
        raise HeatmapError(f"{path}: cannot open as HDF5 ({exc})") from None
    if not values:
        raise HeatmapError(f"{path}: the `scores` group holds no datasets")
    if src is not None:
        values = _check_length(values, FeatureSlide(slide.slide_id, path, src, slide.size0), path)
        return _align(src, values, slide, path)
    return _check_length(values, slide, path)


def scores_file_for(scores: Path, slide: FeatureSlide) -> Path:
    """``scores`` itself when it is a file, else ``<slide>_scores.h5``, ``<slide>.h5``, ``<slide>.csv`` or
    ``<slide>_scores.csv`` in that folder."""
    if scores.is_file():
        return scores
    if not scores.is_dir():
        raise HeatmapError(f"--scores {scores} does not exist; pass a scores .h5/.csv file or a folder of "
                           "<slide>_scores.h5 / <slide>.csv files")
    for name in (f"{slide.slide_id}_scores.h5", f"{slide.slide_id}.h5", f"{slide.slide_id}.csv",
                 f"{slide.slide_id}_scores.csv"):
        if (scores / name).is_file():
            return scores / name
    raise HeatmapError(f"--scores {scores}: no {slide.slide_id}_scores.h5, {slide.slide_id}.h5 or "
                       f"{slide.slide_id}.csv for slide {slide.slide_id!r}")


def mil_patch_scores(model_dir: Path):
    """``evaluation.mil.scores.patch_scores`` after checking ``model_dir`` (before any slide is drawn)."""
    from evaluation.mil.scores import patch_scores

    if not Path(model_dir).is_dir():
        raise HeatmapError(f"--model {model_dir} is not a folder; pass the folder `sgcl eval mil` wrote")
    return patch_scores


def model_scores(model_dir: Path, slide: FeatureSlide, fold: int | None = None) -> dict[str, np.ndarray]:
    """Per-patch scores of a MIL model folder (``sgcl eval mil``): ``evaluation.mil.scores.patch_scores``."""
    patch_scores = mil_patch_scores(model_dir)
    out = patch_scores(model_dir, slide.features(), fold)
    if not isinstance(out, dict) or not out:
        raise HeatmapError(f"--model {model_dir}: patch_scores returned no scores")
    # per-patch scores only: the slide-level `bag_proba_<class>` (one value) is MIL's, in its predictions.csv
    per_patch = {k: np.asarray(v) for k, v in out.items() if not k.startswith("bag_")}
    return _check_length(per_patch, slide, Path(model_dir))
