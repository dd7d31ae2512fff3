"""Feature bags for MIL: which file holds each slide's features, the labels CSV, and a dataset that
reads one bag per step from disk (never the whole cohort in memory).

Feature folders: ours and CLAM's (``h5_files/`` + ``pt_files/``), TRIDENT's (``features_<encoder>/``,
or a job folder holding exactly one such folder), or any folder of ``<slide>.h5`` / ``<slide>.pt``.
An ``.h5`` is read with one contiguous read of its ``features`` dataset (or a sorted index read when
``max_patches`` samples it); a ``.pt`` is memory-mapped (``torch.load(mmap=True)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import h5py
import numpy as np
import torch

from preprocessing.layouts import LayoutError, feature_files_in, slide_id_from_file_name


class MilDataError(ValueError):
    """A features folder or labels CSV that cannot be used; the message names the file and the fix."""


SPLITS = ("train", "val", "test")


def find_feature_files(folder: str | Path, prefer: Literal["h5", "pt"] = "h5") -> dict[str, Path]:
    """``{slide_id: feature file}`` of a features folder of any layout (:func:`preprocessing.layouts.feature_files_in`).
    With both an h5 and a pt for a slide, ``prefer`` picks one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MilDataError(f"features folder {folder} does not exist; pass the --out folder of `sgcl extract` "
                           "(or CLAM's / TRIDENT's features folder)")
    try:
        files = feature_files_in(folder)
    except LayoutError as exc:
        raise MilDataError(str(exc)) from None
    found: dict[str, dict[str, Path]] = {}
    for p in files:
        found.setdefault(slide_id_from_file_name(p), {})[p.suffix[1:]] = p
    if not found:
        raise MilDataError(f"no feature files (<slide>.h5 or <slide>.pt) in {folder} or its h5_files/, pt_files/ "
                           "or features_<encoder>/ folder; run `sgcl extract` first")
    other = "pt" if prefer == "h5" else "h5"
    return {s: d.get(prefer, d.get(other)) for s, d in sorted(found.items())}


def _pt_tensor(path: Path) -> torch.Tensor:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) torch.save format cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        obj = obj.get("features")
    if not isinstance(obj, torch.Tensor):
        raise MilDataError(f"{path}: expected a features tensor (or a dict with 'features'), got {type(obj).__name__}")
    return obj


def bag_shape(path: str | Path) -> tuple[int, int]:
    """(N, D) of a feature file, reading only its header (h5) or memory map (pt)."""
    path = Path(path)
    try:
        if path.suffix == ".pt":
            shape = tuple(_pt_tensor(path).shape)
        else:
            with h5py.File(path, "r") as f:
                if "features" not in f:
                    raise MilDataError(f"{path} has no 'features' dataset (keys: {sorted(f.keys())}); "
                                       "it is not a features file of `sgcl extract`, CLAM or TRIDENT")
                shape = tuple(f["features"].shape)
    except (OSError, RuntimeError) as exc:
        raise MilDataError(f"cannot read {path}: {exc}") from None
    if len(shape) == 3 and shape[0] == 1:  # (1, N, D) bags
        shape = shape[1:]
    if len(shape) != 2:
        raise MilDataError(f"{path}: features must be (N, D), got shape {shape}")
    return int(shape[0]), int(shape[1])


def read_bag(path: str | Path, max_patches: int | None = None, rng: np.random.Generator | None = None) -> torch.Tensor:
    """One slide's (N, D) float32 features; with ``max_patches`` a random subset of that many rows
    (kept in file order). Reads only this bag."""
    path = Path(path)
    if path.suffix == ".pt":
        t = _pt_tensor(path)
        t = t.reshape(-1, t.shape[-1])
        if max_patches and t.shape[0] > max_patches:
            idx = np.sort((rng or np.random.default_rng()).choice(t.shape[0], max_patches, replace=False))
            t = t[torch.from_numpy(idx)]
        return t.to(torch.float32).clone() if t.dtype == torch.float32 else t.to(torch.float32)
    with h5py.File(path, "r") as f:
        ds = f["features"]
        n = ds.shape[-2]
        if max_patches and n > max_patches:
            idx = np.sort((rng or np.random.default_rng()).choice(n, max_patches, replace=False))
            arr = ds[0, idx] if ds.ndim == 3 else ds[idx]
        else:
            arr = ds[0] if ds.ndim == 3 else ds[()]
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


@dataclass
class Cohort:
    """The labelled slides: one row per slide, with its feature file, class index, patient and split."""

    slides: list[str]
    paths: list[Path]
    labels: np.ndarray           # (S,) int64 class index
    classes: list[str]
    patients: list[str]
    splits: list[str] | None     # from the CSV's split column, else None
    n_patches: np.ndarray        # (S,) int64
    feature_dim: int
    ignored_empty: list[str] = field(default_factory=list)  # labelled slides left out: their bag has no patches


def load_cohort(labels_csv: str | Path, features_dir: str | Path, label_column: str = "label",
                slide_column: str = "slide_id", patient_column: str = "patient", split_column: str = "split",
                prefer: Literal["h5", "pt"] = "h5") -> Cohort:
    """Read ``slide_id,label[,patient][,split]`` and match every slide to its feature file, checking every
    row (missing file, mixed feature dimensions, a single class, unknown columns or splits). A slide whose
    bag is empty (no patches, e.g. no tissue) is left out and named in ``ignored_empty``."""
    import pandas as pd

    labels_csv = Path(labels_csv)
    if not labels_csv.is_file():
        raise MilDataError(f"labels CSV {labels_csv} does not exist; pass --labels slides.csv "
                           "(columns slide_id,label[,patient][,split])")
    df = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    cols = list(df.columns)
    for col, key in ((slide_column, "data.slide_column"), (label_column, "data.label_column")):
        if col not in cols:
            raise MilDataError(f"{labels_csv} has no column {col!r} (columns: {', '.join(cols)}); "
                               f"rename it or set {key}=<column>")
    df = df[df[label_column].str.strip() != ""]
    if df.empty:
        raise MilDataError(f"{labels_csv}: no labelled rows in column {label_column!r}")
    slides = [s.strip() for s in df[slide_column]]
    dup = sorted({s for s in slides if slides.count(s) > 1})
    if dup:
        raise MilDataError(f"{labels_csv}: slide(s) listed more than once: {', '.join(dup[:5])}; keep one row per slide")
    files = find_feature_files(features_dir, prefer)
    missing = [s for s in slides if s not in files]
    if missing:
        raise MilDataError(f"slide {missing[0]!r} of {labels_csv} has no feature file in {features_dir} "
                           f"({len(missing)} slide(s) missing{': ' + ', '.join(missing[:5]) if len(missing) > 1 else ''}); "
                           "extract its features or remove its row")
    shapes = [bag_shape(files[s]) for s in slides]
    keep = [n > 0 for n, _ in shapes]
    ignored = [s for s, k in zip(slides, keep) if not k]  # no patches (e.g. no tissue): nothing to learn from
    if ignored:
        df, slides, shapes = df[keep], [s for s, k in zip(slides, keep) if k], [x for x, k in zip(shapes, keep) if k]
        if df.empty:
            raise MilDataError(f"{labels_csv}: every labelled slide has no patches (N=0 in {features_dir}); "
                               "re-tile them (lower tissue.min_fraction?) or label other slides")
    classes = sorted(set(df[label_column].str.strip()))
    if len(classes) < 2:
        raise MilDataError(f"{labels_csv}: only one class ({classes[0]!r}) in column {label_column!r}; "
                           "MIL classification needs at least two")
    labels = np.array([classes.index(v.strip()) for v in df[label_column]], np.int64)
    patients = ([p.strip() or s for p, s in zip(df[patient_column], slides)] if patient_column in cols else list(slides))
    splits = None
    if split_column in cols:
        splits = [v.strip().lower() for v in df[split_column]]
        bad = sorted(set(splits) - set(SPLITS))
        if bad:
            raise MilDataError(f"{labels_csv}: column {split_column!r} has value(s) {bad}; use train, val or test")
        if "train" not in splits or "test" not in splits:
            raise MilDataError(f"{labels_csv}: column {split_column!r} needs train and test rows")
        for p in set(patients):
            sides = {sp for sp, q in zip(splits, patients) if q == p}
            if len(sides) > 1:
                raise MilDataError(f"{labels_csv}: patient {p!r} is in several splits ({', '.join(sorted(sides))}); "
                                   "keep each patient's slides in one split")
    paths = [files[s] for s in slides]
    dims = {}
    for p, (_, d) in zip(paths, shapes):
        dims.setdefault(d, p)
    if len(dims) > 1:
        desc = ", ".join(f"{p} has D={d}" for d, p in dims.items())
        raise MilDataError(f"feature dimensions differ: {desc}; extract every slide with the same encoder")
    return Cohort(slides, paths, labels, classes, patients, splits, np.array([n for n, _ in shapes], np.int64),
                  next(iter(dims)), ignored)


class BagDataset(torch.utils.data.Dataset):
    """``(features (N, D) float32, label, index)`` of the slides ``indices``, read from disk per item.
    ``max_patches`` samples that many rows per bag, re-drawn each epoch (:meth:`set_epoch`), seeded."""

    def __init__(self, cohort: Cohort, indices: Sequence[int], max_patches: int | None = None, seed: int = 0):
        self.cohort, self.indices = cohort, [int(i) for i in indices]
        self.max_patches, self.seed, self.epoch = max_patches, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = self.indices[i]
        rng = np.random.default_rng((self.seed, self.epoch, j)) if self.max_patches else None
        x = read_bag(self.cohort.paths[j], self.max_patches, rng)
        return x, int(self.cohort.labels[j]), j
