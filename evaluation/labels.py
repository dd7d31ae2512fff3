"""Labelled patch sets for the evaluation protocols, and group-aware splitting.

Sources
- class folders: ``root/<class>/*.png|jpg|tif`` (the class is the folder name);
- a CSV with columns ``path,label[,split][,group]`` (relative paths are relative to the CSV);
- HDF5 patch files (``sgcl tile``) + a labels CSV ``slide_id,index,label`` or ``slide_id,x,y,label``
  (x, y = level-0 coords as stored in the file); the group defaults to the slide.

A :class:`LabelledSet` is also a dataset (``__getitem__(i) -> (H, W, 3) uint8``) for
:func:`evaluation.embedding.embed_dataset`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
SPLITS = ("train", "val", "test")


class LabelsError(ValueError):
    """Labelled data that cannot be used (the message says which file/class and the fix)."""


@dataclass
class LabelledSet:
    """Items (``("file", path)`` or ``("h5", path, index)``) with labels, and optional split/group/slide."""
    items: list[tuple]
    labels: list[str]
    splits: list[str] | None = None
    groups: list[str] | None = None
    slides: list[str] | None = None
    source: str = ""
    _files: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.items:
            raise LabelsError(f"{self.source}: no labelled items found")
        n = len(self.items)
        for name in ("labels", "splits", "groups", "slides"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise LabelsError(f"{self.source}: {len(v)} {name} for {n} items")
        missing = [i for i, lab in enumerate(self.labels) if lab is None or str(lab).strip() in ("", "nan")]
        if missing:
            raise LabelsError(f"{self.source}: {len(missing)} items have no label (first: {self.describe(missing[0])}); "
                              "label every item or remove it")

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def label_indices(self, classes: Sequence[str] | None = None) -> np.ndarray:
        lookup = {c: i for i, c in enumerate(classes or self.classes)}
        return np.array([lookup[c] for c in self.labels], dtype=np.int64)

    def describe(self, i: int) -> str:
        it = self.items[i]
        return str(it[1]) if it[0] == "file" else f"{it[1]}[{it[2]}]"

    def key(self) -> list[str]:
        """Stable identity of the items (for feature caching)."""
        return [self.describe(i) for i in range(len(self.items))]

    # dataset protocol ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def __getitem__(self, i: int) -> np.ndarray:
        it = self.items[i]
        if it[0] == "file":
            return read_image(it[1])
        from preprocessing.h5format import PatchFile

        pf = self._files.get(it[1])
        if pf is None:
            pf = self._files[it[1]] = PatchFile(it[1], validate=False)
        return pf.read(it[2])


def read_image(path: str | Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise LabelsError(f"cannot read image {path}; it is missing or not an image file")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def from_class_folders(root: str | Path) -> LabelledSet:
    root = Path(root)
    if not root.is_dir():
        raise LabelsError(f"class-folder root {root} does not exist")
    items, labels = [], []
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(cls_dir.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                items.append(("file", str(f)))
                labels.append(cls_dir.name)
    if not items:
        raise LabelsError(f"{root}: no images in class folders; expected {root}/<class>/*.png")
    return LabelledSet(items, labels, source=str(root))


def from_csv(path: str | Path) -> LabelledSet:
    """``path,label[,split][,group]`` CSV."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"labels CSV {path} does not exist")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for col in ("path", "label"):
        if col not in df.columns:
            raise LabelsError(f"{path}: missing column {col!r} (columns: {list(df.columns)}); expected path,label[,split][,group]")
    items = [("file", str(p if Path(p).is_absolute() else path.parent / p)) for p in df["path"]]
    splits = None
    if "split" in df.columns:
        splits = [s.strip().lower() for s in df["split"]]
        bad = sorted(set(splits) - set(SPLITS))
        if bad:
            raise LabelsError(f"{path}: unknown split values {bad}; use train, val or test")
    groups = list(df["group"]) if "group" in df.columns else None
    return LabelledSet(items, [str(v).strip() for v in df["label"]], splits, groups, source=str(path))


def from_h5_labels(h5_inputs: Sequence[str | Path], labels_csv: str | Path) -> LabelledSet:
    """Patches of ``sgcl tile`` files labelled by ``slide_id,index,label`` or ``slide_id,x,y,label`` rows."""
    import pandas as pd

    from preprocessing.h5format import PatchFile

    labels_csv = Path(labels_csv)
    if not labels_csv.is_file():
        raise LabelsError(f"labels CSV {labels_csv} does not exist")
    df = pd.read_csv(labels_csv, keep_default_na=False)
    if "slide_id" not in df.columns or "label" not in df.columns or not ({"index"} <= set(df.columns) or {"x", "y"} <= set(df.columns)):
        raise LabelsError(f"{labels_csv}: expected columns slide_id,index,label or slide_id,x,y,label; got {list(df.columns)}")
    files: dict[str, PatchFile] = {}
    for p in h5_inputs:
        p = Path(p)
        for f in (sorted(p.glob("*.h5")) if p.is_dir() else [p]):
            pf = PatchFile(f)
            files[pf.slide_id] = pf
    items, labels, slides, splits = [], [], [], []
    coord_index: dict[str, dict[tuple[int, int], int]] = {}
    for r in df.itertuples(index=False):
        sid = str(r.slide_id)
        if sid not in files:
            raise LabelsError(f"{labels_csv}: slide {sid!r} has no patch file among {len(files)} inputs")
        pf = files[sid]
        if "index" in df.columns:
            idx = int(r.index)
            if not 0 <= idx < len(pf):
                raise LabelsError(f"{labels_csv}: index {idx} out of range for {pf.path} ({len(pf)} patches)")
        else:
            lut = coord_index.get(sid)
            if lut is None:
                lut = coord_index[sid] = {(int(x), int(y)): i for i, (x, y) in enumerate(pf.coords())}
            key = (int(r.x), int(r.y))
            if key not in lut:
                raise LabelsError(f"{labels_csv}: no patch at x={key[0]}, y={key[1]} in {pf.path}")
            idx = lut[key]
        items.append(("h5", str(pf.path), idx))
        labels.append(str(r.label).strip())
        slides.append(sid)
        if "split" in df.columns:
            splits.append(str(r.split).strip().lower())
    groups = [str(g) for g in df["group"]] if "group" in df.columns else list(slides)
    return LabelledSet(items, labels, splits or None, groups, slides, source=str(labels_csv))


def load_labelled(kind: str, root: str | None = None, csv: str | None = None, h5: Sequence[str] = ()) -> LabelledSet:
    if kind == "folders":
        if not root:
            raise LabelsError("data.kind=folders needs data.root=<folder with one subfolder per class>")
        return from_class_folders(root)
    if kind == "csv":
        if not csv:
            raise LabelsError("data.kind=csv needs data.csv=<path,label[,split][,group] CSV>")
        return from_csv(csv)
    if kind == "h5":
        if not csv or not h5:
            raise LabelsError("data.kind=h5 needs data.h5=[patch files or folders] and data.csv=<labels CSV>")
        return from_h5_labels(h5, csv)
    raise LabelsError(f"unknown data.kind {kind!r}; choose folders, csv or h5")


def group_split(labels: Sequence[str], groups: Sequence[str] | None = None,
                fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0) -> np.ndarray:
    """Assign each item to ``train``/``val``/``test`` so that no group is on two sides.

    Groups (default: each item its own group) are stratified by their majority label: within each
    label, groups are shuffled (seeded) and dealt greedily to the split furthest below its target
    share of that label's items. A split with fraction 0 gets nothing. Raises when a class has too
    few items/groups to appear in every split with a positive fraction.
    """
    labels = [str(v) for v in labels]
    n = len(labels)
    groups = [str(g) for g in groups] if groups is not None else [f"#{i}" for i in range(n)]
    frac = np.asarray(fractions, dtype=np.float64)
    if frac.shape != (3,) or (frac < 0).any() or frac.sum() <= 0:
        raise LabelsError(f"split fractions must be three non-negative numbers (train, val, test), got {fractions}")
    frac = frac / frac.sum()
    needed = int((frac > 0).sum())
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    by_label: dict[str, list[str]] = {}
    for g, idx in members.items():
        vals, counts = np.unique([labels[i] for i in idx], return_counts=True)
        by_label.setdefault(str(vals[np.argmax(counts)]), []).append(g)
    class_counts = {c: labels.count(c) for c in set(labels)}
    for c, cnt in sorted(class_counts.items()):
        if cnt < needed:
            raise LabelsError(f"class {c!r} has only {cnt} sample(s); it cannot be split into {needed} parts "
                              "(add samples of this class or remove it)")
        if len(by_label.get(c, [])) < needed:
            raise LabelsError(f"class {c!r} occurs in only {len(by_label.get(c, []))} group(s); a group-aware split "
                              f"needs {needed} (add groups/patients of this class or remove it)")
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=object)
    for c in sorted(by_label):
        gs = list(by_label[c])
        rng.shuffle(gs)
        gs.sort(key=lambda g: -len(members[g]))  # big groups first, random among equals (stable sort)
        total = sum(len(members[g]) for g in gs)
        have = np.zeros(3)
        # first make sure each split with a positive fraction gets one group
        order = [s for s in np.argsort(-frac, kind="stable") if frac[s] > 0]
        remaining = list(gs)
        for s in order[::-1]:  # smallest-fraction split first takes a smallest group
            g = min(remaining, key=lambda q: len(members[q]))
            remaining.remove(g)
            for i in members[g]:
                out[i] = SPLITS[s]
            have[s] += len(members[g])
        for g in remaining:
            deficit = frac * total - have
            deficit[frac == 0] = -np.inf
            s = int(np.argmax(deficit))
            for i in members[g]:
                out[i] = SPLITS[s]
            have[s] += len(members[g])
    return out.astype(str)
