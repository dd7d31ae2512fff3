"""Evaluation half of the quality benchmark (issue #9, item 5): real labelled data, honest splits.

Pure functions, called by ``benchmarks/quality.py`` once per (encoder, seed):

- :func:`load_classification_tasks` — three labelled patch sets from ``../shared/data/patches``, rescaled
  to the benchmark's µm/px, each with its split unit (tile / source slide / patient) and caveats;
- :func:`embed_task` / :func:`embed_tasks` — features through the toolkit's one inference path
  (``evaluation.embedding.load_encoder`` + ``embed_dataset``), at each task's native patch size so the
  scale set here is the scale the encoder sees;
- :func:`classification_scores` — (:mod:`evaluation.crossval` on a task) kNN (DINO weighted vote) and linear-probe balanced accuracy from
  out-of-fold predictions over group-aware folds; hyper-parameters chosen by an inner group-aware
  cross-validation inside each fold's training part (the test fold is never seen); bootstrap CIs
  resampling whole groups;
- :func:`build_seg_task` — NuInsSeg human spleen (expert nucleus masks) at the benchmark's µm/px, in
  the ``train/ val/ test/`` layout that ``sgcl eval seg`` reads, split by image;
- :func:`segmentation_scores` — ``evaluation.segmentation.train.finetune`` at a label fraction, test
  Dice (per-image mean and pooled) with bootstrap CIs over test images; resumable.

Protocol (classification)
    Outer folds: leave-one-group-out when the task has at most ``max_folds`` (default 5) groups,
    otherwise a group k-fold with ``max_folds`` folds whose groups are dealt class by class (stratified
    by each group's majority label; a class with two or more groups is then in every training part).
    With the defaults: osteosarcoma leave-one-patient-out (4 folds), Kather 2016 5 folds of source
    slides, CRC-VAL-HE-7K 5 folds of tiles. A group is never on both sides. Every item gets exactly one
    out-of-fold prediction. A test item whose class has no example in its fold's training part
    cannot be predicted correctly by any encoder; it is left out of the score and reported
    (``unscorable``). Inside each fold, the training part is split again by group (``inner_folds``,
    default 2, the same dealing); k ∈ {1, 3, 5, 10, 20} (kNN, DINO vote, T = 0.07, clipped to the
    bank) and L2 ∈ {0.01 … 100} (multinomial logistic regression on standardised features, L-BFGS
    capped at 50 iterations: within ~1 % of the converged objective on these sets for L2 ≥ 0.01)
    maximise the pooled inner out-of-fold balanced accuracy (ties: larger k, stronger L2); the model
    is then refitted on the whole training part and predicts the test fold.

Costs on one CPU thread (ResNet-18, mpp 1.0): loading the three tasks ≈ 6-9 s once; per encoder,
embedding ≈ 8-10 s (557 items; 466 are osteosarcoma crops) and scores ≈ 12 s. One
``segmentation_scores`` call at :data:`DEFAULT_SEG_BUDGET` ≈ 60-75 s of CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from evaluation.crossval import crossval_scores

# --------------------------------------------------------------------------------------------------
# constants

CRC_DIR = "patches/crc-val-he-7k-sample"
KATHER_DIR = "patches/kather2016-sample"
OSTEO_DIR = "patches/osteosarcoma-sample"
SPLEEN_DIR = "seg/nuinsseg-human-spleen"

CRC_MPP = 0.5
KATHER_MPP = 0.495  # 150 px = 74 µm (Kather et al. 2016)
OSTEO_MPP = 1.0  # "10x, ≈1 µm/px; the exact µm/px is not stated" (data README)
SPLEEN_MPP = 0.25  # NuInsSeg: 40x; the data README gives no µm/px, 0.25 is the usual 40x value (assumed)

TASK_ORDER = ("crc7k", "kather2016", "osteosarcoma")


SEG_SPLIT_FRACTIONS = (0.60, 0.15, 0.25)  # train / val / test, by image
SEG_SPLIT_SEED = 0
SEG_TASK_FILE = "task.json"

#: default CPU budget of one ``segmentation_scores`` call (ResNet-18 U-Net, one CPU thread: about a minute).
#: ``keep_checkpoints=False`` deletes best.pt/last.pt (~230 MB for ResNet-18) once results.json is written.
DEFAULT_SEG_BUDGET = {"epochs": 4, "steps_per_epoch": 12, "batch_size": 8, "patch_size": 96, "overlap": 0.25,
                      "infer_batch": 16, "lr": 1e-3, "encoder_lr": 1e-4, "frozen": False, "threads": 0,
                      "device": "auto", "keep_checkpoints": False}
#: a pipeline check (CI): a few seconds
QUICK_SEG_BUDGET = {**DEFAULT_SEG_BUDGET, "epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "patch_size": 64,
                    "overlap": 0.0}


# --------------------------------------------------------------------------------------------------
# classification tasks

@dataclass
class ClassificationTask:
    """A labelled set: images (H, W, 3) uint8 at the benchmark scale, integer labels, the split unit.

    ``groups`` is the unit a split must keep together (tile, source slide, patient); ``image_ids``
    the source image of each item (crops of one image share it; equal to the item for whole tiles).
    The task is also a dataset for :func:`evaluation.embedding.embed_dataset`.
    """
    name: str
    labels: np.ndarray
    class_names: list[str]
    groups: np.ndarray
    image_ids: np.ndarray
    images: list[np.ndarray] = field(default_factory=list, repr=False)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.groups = np.asarray([str(g) for g in self.groups])
        self.image_ids = np.asarray([str(g) for g in self.image_ids])
        n = len(self.labels)
        if len(self.groups) != n or len(self.image_ids) != n or (self.images and len(self.images) != n):
            raise ValueError(f"task {self.name}: {n} labels, {len(self.groups)} groups, {len(self.image_ids)} image ids, "
                             f"{len(self.images)} images; they must match")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"task {self.name}: labels must be in [0, {len(self.class_names)})")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images[i]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def patch_px(self) -> int:
        """Side of the (square) items; the encoder sees them at this size."""
        sides = {max(im.shape[:2]) for im in self.images}
        return max(sides) if sides else 0

    def subset(self, idx: Sequence[int], name: str | None = None) -> "ClassificationTask":
        idx = np.asarray(idx, dtype=np.int64)
        return ClassificationTask(name or self.name, self.labels[idx], list(self.class_names), self.groups[idx],
                                  self.image_ids[idx], [self.images[i] for i in idx] if self.images else [],
                                  dict(self.meta))


def rescale(image: np.ndarray, src_mpp: float, mpp: float) -> np.ndarray:
    """Resample ``image`` from ``src_mpp`` to ``mpp`` µm/px: area interpolation when shrinking, bicubic
    when enlarging; unchanged when the scales agree within 0.5 %."""
    import cv2

    factor = float(src_mpp) / float(mpp)
    if abs(factor - 1.0) < 0.005:
        return np.ascontiguousarray(image)
    h, w = image.shape[:2]
    size = (max(1, int(round(w * factor))), max(1, int(round(h * factor))))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(image, size, interpolation=interp))


def tissue_mask(image: np.ndarray, min_saturation: int = 20) -> np.ndarray:
    """Pixels whose channel spread (max − min, 0–255) exceeds ``min_saturation``: white/grey background
    has almost none; even pale eosin has 25+."""
    return (image.max(-1).astype(np.int16) - image.min(-1)) > min_saturation


def tissue_fraction(image: np.ndarray, min_saturation: int = 20) -> float:
    return float(tissue_mask(image, min_saturation).mean())


def _class_counts(labels: np.ndarray, names: Sequence[str]) -> dict[str, int]:
    return {c: int((labels == i).sum()) for i, c in enumerate(names)}


def _groups_per_class(labels: np.ndarray, groups: np.ndarray, names: Sequence[str]) -> dict[str, int]:
    return {c: int(len(set(groups[labels == i]))) for i, c in enumerate(names)}


def _drop_single_group_classes(task: ClassificationTask) -> ClassificationTask:
    """Remove classes that occur in fewer than two groups: a split that keeps groups apart can never
    put them on both sides, so they could never be tested fairly. Recorded in ``meta``."""
    per = _groups_per_class(task.labels, task.groups, task.class_names)
    drop = [c for c, g in per.items() if g < 2]
    if not drop:
        return task
    keep_cls = [c for c in task.class_names if c not in drop]
    keep = np.flatnonzero(np.isin(task.labels, [task.class_names.index(c) for c in keep_cls]))
    remap = {task.class_names.index(c): i for i, c in enumerate(keep_cls)}
    sub = task.subset(keep)
    sub.labels = np.array([remap[int(v)] for v in sub.labels], np.int64)
    sub.class_names = keep_cls
    sub.meta["dropped_classes"] = {}
    for c in drop:
        where = sorted(set(task.groups[task.labels == task.class_names.index(c)]))
        why = (f"all {int((task.labels == task.class_names.index(c)).sum())} items come from one "
               f"{task.meta.get('split_unit', 'group')} ({', '.join(where)}): a group-aware split cannot test it")
        sub.meta["dropped_classes"][c] = why
        sub.meta["caveats"] = [*sub.meta.get("caveats", []), f"class {c} dropped: {why}"]
    return sub


def _finish_meta(task: ClassificationTask, mpp: float, quick: bool) -> ClassificationTask:
    m = task.meta
    m.update({"name": task.name, "n_items": len(task), "n_images": int(len(set(task.image_ids))),
              "n_groups": int(len(set(task.groups))), "classes": list(task.class_names),
              "items_per_class": _class_counts(task.labels, task.class_names),
              "groups_per_class": _groups_per_class(task.labels, task.groups, task.class_names),
              "mpp": float(mpp), "patch_px": task.patch_px, "chance": 1.0 / task.num_classes, "quick": bool(quick)})
    return task


def _load_crc(root: Path, mpp: float, quick: bool) -> ClassificationTask:
    from evaluation.labels import from_class_folders

    ls = from_class_folders(root)
    names = ls.classes
    y = ls.label_indices(names)
    idx = np.arange(len(ls))
    if quick:  # first 4 tiles of each class (sorted file names)
        idx = np.concatenate([np.flatnonzero(y == c)[:4] for c in range(len(names))])
    images = [rescale(ls[int(i)], CRC_MPP, mpp) for i in idx]
    ids = [Path(ls.items[int(i)][1]).stem for i in idx]
    task = ClassificationTask("crc7k", y[idx], names, ids, ids, images, {
        "source": str(root), "dataset": "CRC-VAL-HE-7K sample (Kather et al., PLOS Medicine 2019), CC BY 4.0",
        "source_mpp": CRC_MPP, "source_px": 224, "split_unit": "tile",
        "caveats": [
            "No patient id in the file names: the split unit is the tile, so tiles of one patient can fall on "
            "both sides of a split (optimistic scores; use for coarse comparisons between encoders only).",
            "CRC-VAL-HE-7K tiles are Macenko colour-normalised and were JPEG re-encoded by the repository they "
            "came from.",
        ]})
    return task


def _load_kather(root: Path, mpp: float, quick: bool) -> ClassificationTask:
    from evaluation.labels import from_class_folders

    ls = from_class_folders(root)
    folder_names = ls.classes
    names = [re.sub(r"^\d+_", "", c) for c in folder_names]
    y = ls.label_indices(folder_names)
    slides = []
    for it in ls.items:
        m = re.search(r"CRC-Prim-HE-(\d+)", Path(it[1]).name)
        if not m:
            raise ValueError(f"{it[1]}: no source slide CRC-Prim-HE-NN in the file name")
        slides.append(f"CRC-Prim-HE-{int(m.group(1)):02d}")
    images = [rescale(ls[i], KATHER_MPP, mpp) for i in range(len(ls))]
    ids = [Path(it[1]).stem for it in ls.items]
    task = ClassificationTask("kather2016", y, names, slides, ids, images, {
        "source": str(root), "dataset": "Kather et al., Scientific Reports 2016 (Zenodo 53169), CC BY 4.0",
        "source_mpp": KATHER_MPP, "source_px": 150, "split_unit": "source slide (CRC-Prim-HE-NN in the file name)",
        "caveats": [
            "3 tiles per class from 10 slides; most classes occur in only 2-3 slides, so each fold's training "
            "part holds 1-2 examples of some classes: a very noisy set.",
            f"150-px tiles are only {int(round(150 * KATHER_MPP / mpp))} px at {mpp:g} µm/px.",
        ]})
    task = _drop_single_group_classes(task)
    return task  # quick: the whole set is already tiny


def _osteo_patient(name: str) -> str:
    m = re.match(r"^(Case-\d+|P\d+)-", name)
    if not m:
        raise ValueError(f"osteosarcoma image {name}: no patient (Case-N or PN) at the start of the file name")
    return m.group(1)


def _load_osteo(root: Path, mpp: float, quick: bool, crop_px: int, crops_per_image: int,
                min_tissue: float) -> ClassificationTask:
    from evaluation.labels import from_class_folders

    ls = from_class_folders(root)
    names = ls.classes
    y = ls.label_indices(names)
    patients = [_osteo_patient(Path(it[1]).name) for it in ls.items]
    order = np.arange(len(ls))
    per_image = 2 if quick else crops_per_image
    if quick:  # 2 images per (class, patient)
        keep, seen = [], {}
        for i in order:
            key = (int(y[i]), patients[i])
            if seen.get(key, 0) < 2:
                keep.append(i)
                seen[key] = seen.get(key, 0) + 1
        order = np.asarray(keep)
    rng = np.random.default_rng(0)  # fixed: the task is the same for every benchmark seed
    images, labels, groups, ids, kept_counts = [], [], [], [], {}
    for i in order:
        img = rescale(ls[int(i)], OSTEO_MPP, mpp)
        h, w = img.shape[:2]
        rows, cols = h // crop_px, w // crop_px
        cells = [(r * crop_px, c * crop_px) for r in range(rows) for c in range(cols)]
        tissue = tissue_mask(img[:rows * crop_px, :cols * crop_px])
        frac = tissue.reshape(rows, crop_px, cols, crop_px).mean((1, 3)).reshape(-1)
        ok = np.flatnonzero(frac >= min_tissue)
        if ok.size == 0:  # keep the most tissue-rich crop rather than lose the image
            ok = np.array([int(np.argmax(frac))])
        pick = np.sort(rng.choice(ok, size=min(per_image, ok.size), replace=False))
        stem = Path(ls.items[int(i)][1]).stem
        kept_counts[stem] = int(pick.size)
        for j in pick:
            r, c = cells[int(j)]
            images.append(np.ascontiguousarray(img[r:r + crop_px, c:c + crop_px]))
            labels.append(int(y[i]))
            groups.append(patients[int(i)])
            ids.append(stem)
    counts = np.array(list(kept_counts.values()))
    task = ClassificationTask("osteosarcoma", np.array(labels), names, groups, ids, images, {
        "source": str(root), "dataset": "Osteosarcoma Tumor Assessment (Leavey et al.; Arunachalam et al., PLOS ONE "
                                        "2019), TCIA, CC BY 3.0",
        "source_mpp": OSTEO_MPP, "source_px": 1024, "split_unit": "patient (Case-3, Case-4, Case-48, P9)",
        "crops": {"crop_px": crop_px, "per_image_max": per_image, "min_tissue_fraction": min_tissue,
                  "selection": "non-overlapping grid, crops with enough tissue, then a fixed random choice (seed 0)",
                  "images": int(len(kept_counts)), "crops_per_image_min": int(counts.min()),
                  "crops_per_image_mean": round(float(counts.mean()), 2)},
        "caveats": [
            "The image µm/px is not stated (10x, ≈1 µm/px assumed).",
            "Crops inherit the label of their 1024-px image (weak labels: a crop of a 'Viable' image may show "
            "stroma or bone).",
            "Classes and patients are confounded: Non-Viable-Tumor comes only from Case-3 and Case-4, Viable only "
            "from Case-4 and Case-48, P9 only has Non-Tumor. A leave-one-patient-out fold therefore trains some "
            "classes on a single patient.",
            "Only 4 patients: patient-level bootstrap is degenerate, so the CI resamples images (crops of one "
            "image together) and does not include between-patient variance.",
            "Non-Tumor images are mostly white background; crops need ≥ "
            f"{min_tissue:.0%} tissue so that the amount of background is not a shortcut.",
        ]})
    return task


def load_classification_tasks(shared: Path, mpp: float = 1.0, quick: bool = False, osteo_crop_px: int = 112,
                              osteo_crops_per_image: int = 8,
                              osteo_min_tissue: float = 0.5) -> dict[str, ClassificationTask]:
    """The three labelled sets at ``mpp`` µm/px: ``{"crc7k", "kather2016", "osteosarcoma"}``.

    ``shared`` is the ``../shared/data`` folder. Deterministic (no seed): the tasks are the same for every
    benchmark seed. ``quick`` takes a small subset (4 CRC tiles per class, all Kather tiles, 2 images per
    osteosarcoma class and patient with 2 crops each) for a pipeline check.
    """
    shared = Path(shared)
    for sub in (CRC_DIR, KATHER_DIR, OSTEO_DIR):
        if not (shared / sub).is_dir():
            raise FileNotFoundError(f"{shared / sub} is missing; the quality benchmark needs ../shared/data "
                                    "(see its README.md)")
    tasks = {
        "crc7k": _load_crc(shared / CRC_DIR, mpp, quick),
        "kather2016": _load_kather(shared / KATHER_DIR, mpp, quick),
        "osteosarcoma": _load_osteo(shared / OSTEO_DIR, mpp, quick, osteo_crop_px, osteo_crops_per_image,
                                    osteo_min_tissue),
    }
    return {k: _finish_meta(v, mpp, quick) for k, v in tasks.items()}


# --------------------------------------------------------------------------------------------------
# features

def embed_task(encoder, task: ClassificationTask, batch_size: int = 64, device: str = "cpu",
               precision: str = "fp32", input_size: int | None = None) -> np.ndarray:
    """(N, D) features of ``task`` with an :class:`evaluation.embedding.Encoder` (from ``load_encoder``).

    The items are fed at their own size (``task.patch_px``) so the encoder sees the benchmark's µm/px;
    ``input_size`` forces another size (then the scale changes by ``input_size / patch_px``).
    """
    from evaluation.embedding import embed_dataset

    enc = dataclasses.replace(encoder, input_size=int(input_size or task.patch_px))
    return embed_dataset(enc, task, batch_size=batch_size, num_workers=0, device=device, precision=precision)


def embed_tasks(encoder_spec: str, tasks: dict[str, ClassificationTask], batch_size: int = 64,
                device: str = "cpu", precision: str = "fp32") -> tuple[dict[str, np.ndarray], dict]:
    """Load ``encoder_spec`` once (export folder or timm name = seeded random init) and embed every task.
    Returns ``({task: features}, info)`` with the encoder identity and seconds per task."""
    from evaluation.embedding import load_encoder

    t0 = time.perf_counter()
    enc = load_encoder(encoder_spec)
    info = {"encoder": encoder_spec, "model_name": enc.name, "weights_sha256": enc.info.get("sha256"),
            "load_s": round(time.perf_counter() - t0, 3), "embed_s": {}}
    feats = {}
    for name, task in tasks.items():
        t = time.perf_counter()
        feats[name] = embed_task(enc, task, batch_size, device, precision)
        info["embed_s"][name] = round(time.perf_counter() - t, 3)
    return feats, info


# --------------------------------------------------------------------------------------------------
# classification scores (the protocol lives in evaluation.crossval)

def classification_scores(features: np.ndarray, task: ClassificationTask, seed: int = 0, n_boot: int = 1000,
                          **kwargs) -> dict:
    """:func:`evaluation.crossval.crossval_scores` on ``task``'s labels, split unit and source images."""
    return crossval_scores(features, task.labels, task.groups, task.class_names, task.image_ids, name=task.name,
                           split_unit=task.meta.get("split_unit", "group"), seed=seed, n_boot=n_boot, **kwargs)


# --------------------------------------------------------------------------------------------------
# segmentation task

def _seg_split(names: Sequence[str], fractions=SEG_SPLIT_FRACTIONS, seed: int = SEG_SPLIT_SEED) -> dict[str, list[str]]:
    names = sorted(names)
    n = len(names)
    n_val = max(1, int(round(fractions[1] * n)))
    n_test = max(1, int(round(fractions[2] * n)))
    if n - n_val - n_test < 1:
        raise ValueError(f"{n} images are too few for a train/val/test split")
    order = np.random.default_rng(seed).permutation(n)
    picked = [names[i] for i in order]
    return {"test": sorted(picked[:n_test]), "val": sorted(picked[n_test:n_test + n_val]),
            "train": sorted(picked[n_test + n_val:])}


def _seg_params(src: Path, mpp: float) -> dict:
    return {"source": str(src), "source_mpp": SPLEEN_MPP, "mpp": float(mpp), "split_fractions": list(SEG_SPLIT_FRACTIONS),
            "split_seed": SEG_SPLIT_SEED, "image_interpolation": "area (bicubic when enlarging)",
            "mask_interpolation": "nearest", "mask_values": "0 background, 1 nucleus (source PNGs are 0/255)"}


def _seg_complete(root: Path, params: dict) -> bool:
    meta_path = root / SEG_TASK_FILE
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("params") != json.loads(json.dumps(params)):
        return False
    return all((root / s / d / f"{n}.png").is_file() for s, names in meta["splits"].items() for n in names
               for d in ("images", "masks"))


def build_seg_task(shared: Path, out_dir: Path, mpp: float = 0.5) -> Path:
    """NuInsSeg human spleen (34 images, expert binary nucleus masks) at ``mpp`` µm/px in
    ``out_dir/{train,val,test}/{images,masks}/<name>.png`` + ``task.json``; a fixed split by image
    (60/15/25 %, seed 0). Idempotent: a complete folder with the same parameters is reused; one with
    other parameters is an error. Returns ``out_dir``."""
    import cv2

    from evaluation.segmentation.data import read_image, read_mask
    from sgcl.utils.atomic import atomic_write_json

    src = Path(shared) / SPLEEN_DIR
    out_dir = Path(out_dir)
    params = _seg_params(src, mpp)
    if _seg_complete(out_dir, params):
        return out_dir
    if (out_dir / SEG_TASK_FILE).is_file():
        old = json.loads((out_dir / SEG_TASK_FILE).read_text()).get("params")
        if old != json.loads(json.dumps(params)):
            raise ValueError(f"{out_dir} holds a segmentation task built with other parameters ({old}); "
                             "pass another out_dir or delete it")
    if not (src / "images").is_dir() or not (src / "masks").is_dir():
        raise FileNotFoundError(f"{src}/images and {src}/masks are needed (NuInsSeg human spleen in ../shared/data)")
    names = sorted(p.stem for p in (src / "images").glob("*.png"))
    if not names:
        raise FileNotFoundError(f"no images in {src / 'images'}")
    splits = _seg_split(names)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    fg = {}
    for split, members in splits.items():
        (tmp / split / "images").mkdir(parents=True, exist_ok=True)
        (tmp / split / "masks").mkdir(parents=True, exist_ok=True)
        fg[split] = []
        for name in members:
            image = read_image(src / "images" / f"{name}.png")
            mask = read_mask(src / "masks" / f"{name}.png")
            if mask.shape != image.shape[:2]:
                raise ValueError(f"{src / 'masks' / name}.png does not match its image's size")
            mask = (mask > 0).astype(np.uint8)
            image = rescale(image, SPLEEN_MPP, mpp)
            if mask.shape != image.shape[:2]:
                mask = cv2.resize(mask, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
            cv2.imwrite(str(tmp / split / "images" / f"{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(tmp / split / "masks" / f"{name}.png"), mask)
            fg[split].append(float(mask.mean()))
    size = image.shape[:2]
    meta = {"params": params, "splits": splits, "counts": {s: len(v) for s, v in splits.items()},
            "image_px": [int(size[1]), int(size[0])],
            "foreground_fraction": {s: round(float(np.mean(v)), 4) for s, v in fg.items()},
            "dataset": "NuInsSeg human spleen (Mahbod et al., Scientific Data 2024), CC BY 4.0; expert manual masks",
            "caveats": [f"µm/px assumed {SPLEEN_MPP} (40x; not stated by the data README)",
                        "split by image: NuInsSeg names carry no patient/slide id, so images of one tissue sample "
                        "may be on both sides (one organ only)",
                        "binary masks: touching nuclei merge; instance masks are not used"]}
    atomic_write_json(tmp / SEG_TASK_FILE, meta)
    if out_dir.exists():  # an incomplete earlier build (no valid task.json): replace only what we write
        for sub in ("train", "val", "test"):
            if (out_dir / sub).exists():
                shutil.rmtree(out_dir / sub)
        for p in tmp.iterdir():
            os.replace(p, out_dir / p.name)
        tmp.rmdir()
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------------
# segmentation scores

def _seg_overrides(fraction: float, seed: int, budget: dict) -> list[str]:
    unknown = sorted(set(budget) - set(DEFAULT_SEG_BUDGET))
    if unknown:
        raise ValueError(f"unknown segmentation budget keys {unknown}; known: {sorted(DEFAULT_SEG_BUDGET)}")
    b = {**DEFAULT_SEG_BUDGET, **budget}
    return [f"train.label_fraction={fraction}", f"train.seed={seed}", f"train.epochs={b['epochs']}",
            f"train.steps_per_epoch={b['steps_per_epoch']}", f"train.batch_size={b['batch_size']}",
            f"train.patch_size={b['patch_size']}", f"train.lr={b['lr']}", f"train.encoder_lr={b['encoder_lr']}",
            f"train.threads={b['threads']}", "train.num_workers=0", f"model.frozen={str(bool(b['frozen'])).lower()}",
            f"device={b['device']}", f"infer.overlap={b['overlap']}", f"infer.batch_size={b['infer_batch']}",
            "infer.save_png=1000"]


def _percentile(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    samples = samples[~np.isnan(samples)]
    if not samples.size:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    return float(np.quantile(samples, a)), float(np.quantile(samples, 1 - a))


def segmentation_scores(encoder_spec: str, task_root: Path, fraction: float, seed: int, out: Path,
                        budget: dict | None = None, n_boot: int = 1000) -> dict:
    """Fine-tune a U-Net on ``encoder_spec`` with ``fraction`` of the training images (seeded subset, at
    least one; nested across fractions for one seed) and test on the task's test images.

    ``budget``: keys of :data:`DEFAULT_SEG_BUDGET` (missing keys take its values; :data:`QUICK_SEG_BUDGET`
    for a pipeline check). Returns foreground Dice per image (mean) and pooled over the test images, each
    with a percentile bootstrap CI over test images. ``out/results.json`` of an earlier identical run is
    reused (a different config in ``out`` is an error, as in ``sgcl eval seg``)."""
    from evaluation.segmentation.config import SegConfig
    from evaluation.segmentation.data import discover_splits, read_mask, select_fraction
    from evaluation.segmentation.train import BEST, LAST, finetune
    from sgcl.config import load_config, to_dict

    task_root, out = Path(task_root), Path(out)
    budget = dict(budget or {})
    overrides = _seg_overrides(fraction, seed, budget)
    t0 = time.perf_counter()
    res_path = out / "results.json"
    reused = res_path.is_file()
    if reused:
        results = json.loads(res_path.read_text())
        cfg = load_config(SegConfig, None, [f"model.encoder={encoder_spec}", f"data={task_root}", f"out={out}",
                                            *overrides])
        if results.get("config") != json.loads(json.dumps(to_dict(cfg))):
            raise ValueError(f"{res_path} was written with another config; pass another out or delete {out}")
    else:
        results = finetune(encoder_spec, task_root, out, overrides)
        if not {**DEFAULT_SEG_BUDGET, **budget}["keep_checkpoints"]:
            for name in (BEST, LAST):  # ~60 + 170 MB per ResNet-18 run; results.json is what resumes
                (out / name).unlink(missing_ok=True)
    seconds = time.perf_counter() - t0

    splits = discover_splits(task_root)
    train_pairs = select_fraction(splits["train"], fraction, seed=seed)
    test_pairs = splits["test"]
    tp, fp, fn, per_image = [], [], [], []
    for pair in test_pairs:
        target = read_mask(pair.mask)
        pred_path = out / "predictions" / f"{pair.name}_mask.png"
        if not pred_path.is_file():
            raise FileNotFoundError(f"{pred_path} is missing (results.json without its predictions); delete {out} "
                                    "and run again")
        pred = read_mask(pred_path)
        valid = target != 255
        t, p = (target == 1) & valid, (pred == 1) & valid
        tp.append(int((t & p).sum()))
        fp.append(int((~t & p & valid).sum()))
        fn.append(int((t & ~p).sum()))
        denom = 2 * tp[-1] + fp[-1] + fn[-1]
        per_image.append(2 * tp[-1] / denom if denom else np.nan)
    tp, fp, fn, per_image = (np.asarray(v, np.float64) for v in (tp, fp, fn, per_image))
    pooled = float(2 * tp.sum() / max(1.0, 2 * tp.sum() + fp.sum() + fn.sum()))
    ref = results["test"]["mean_dice"]
    if ref is not None and abs(pooled - ref) > 1e-6:
        raise RuntimeError(f"pooled Dice from the saved predictions ({pooled:.6f}) differs from results.json "
                           f"({ref:.6f}); the predictions in {out / 'predictions'} are stale")
    rng = np.random.default_rng(seed)
    n = len(test_pairs)
    idx = rng.integers(0, n, (int(n_boot), n))
    boot_mean = np.nanmean(per_image[idx], axis=1) if n_boot else np.zeros(0)
    s_tp, s_fp, s_fn = tp[idx].sum(1), fp[idx].sum(1), fn[idx].sum(1)
    boot_pooled = 2 * s_tp / np.maximum(1.0, 2 * s_tp + s_fp + s_fn)
    b = {**DEFAULT_SEG_BUDGET, **budget}
    return {
        "encoder": encoder_spec, "encoder_sha256": results["encoder"].get("sha256"), "fraction": float(fraction),
        "seed": int(seed), "budget": b, "task_root": str(task_root), "out": str(out),
        "train_images": len(train_pairs), "train_image_names": [p.name for p in train_pairs],
        "val_images": len(splits["val"]), "test_images": n,
        "dice_per_image": {"value": float(np.nanmean(per_image)), **dict(zip(("low", "high"), _percentile(boot_mean)))},
        "dice_pooled": {"value": pooled, **dict(zip(("low", "high"), _percentile(boot_pooled)))},
        "iou_pooled": results["test"]["mean_iou"],
        "per_image": {p.name: (None if np.isnan(d) else float(d)) for p, d in zip(test_pairs, per_image)},
        "best_epoch": results["best_epoch"], "best_val_dice": results["best_val_mean_dice"],
        "n_boot": int(n_boot), "ci_unit": "test image", "reused": reused, "seconds": round(seconds, 2),
    }
