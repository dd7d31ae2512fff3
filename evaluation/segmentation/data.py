"""Image/mask pairs for segmentation: discovery, validation, label fractions and patch sampling.

Layouts accepted by :func:`discover_splits`:
- ``<root>/{train,val,test}/images/*`` + ``<root>/{train,val,test}/masks/*.png`` (splits given);
- ``<root>/images/*`` + ``<root>/masks/*.png`` (split here by a seeded shuffle);
- a CSV with columns ``image,mask[,split]`` (paths relative to the CSV's folder allowed).

Masks are single-channel PNGs of class indices (0 = background, 1..K-1, 255 = ignore), matched
to images by file stem.
"""

from __future__ import annotations

import csv
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .metrics import IGNORE_INDEX

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SPLITS = ("train", "val", "test")


class SegDataError(ValueError):
    """Missing, unreadable or inconsistent segmentation data; the message names the file."""


@dataclass(frozen=True)
class SegPair:
    image: Path
    mask: Path
    name: str


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def pairs_from_folders(images_dir: Path, masks_dir: Path) -> list[SegPair]:
    """Pair every image with the mask of the same stem; a missing mask is an error."""
    if not images_dir.is_dir():
        raise SegDataError(f"{images_dir} does not exist; expected a folder of images beside masks/")
    if not masks_dir.is_dir():
        raise SegDataError(f"{masks_dir} does not exist; put one PNG of class indices per image there (same file stem)")
    masks = {p.stem: p for p in _images_in(masks_dir)}
    images = _images_in(images_dir)
    if not images:
        raise SegDataError(f"{images_dir} contains no images ({', '.join(IMAGE_EXTS)})")
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise SegDataError(f"{len(missing)} image(s) in {images_dir} have no mask in {masks_dir} "
                           f"(e.g. {missing[:3]}); expected {masks_dir / (Path(missing[0]).stem + '.png')}")
    return [SegPair(p, masks[p.stem], p.stem) for p in images]


def pairs_from_csv(csv_path: Path) -> dict[str, list[SegPair]]:
    """``image,mask[,split]`` rows; relative paths are resolved against the CSV's folder."""
    out: dict[str, list[SegPair]] = {}
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"image", "mask"} <= set(reader.fieldnames):
            raise SegDataError(f"{csv_path}: needs the columns image,mask (and optionally split); found {reader.fieldnames}")
        for i, row in enumerate(reader, start=2):
            image, mask = Path(row["image"]), Path(row["mask"] or "")
            image = image if image.is_absolute() else csv_path.parent / image
            mask = mask if mask.is_absolute() else csv_path.parent / mask
            if not row["mask"] or not mask.is_file():
                raise SegDataError(f"{csv_path} line {i}: mask {row['mask']!r} for {row['image']} does not exist")
            if not image.is_file():
                raise SegDataError(f"{csv_path} line {i}: image {row['image']} does not exist")
            split = (row.get("split") or "all").strip().lower()
            if split not in SPLITS + ("all",):
                raise SegDataError(f"{csv_path} line {i}: split {split!r} is not one of train/val/test")
            out.setdefault(split, []).append(SegPair(image, mask, image.stem))
    if not out:
        raise SegDataError(f"{csv_path} has no rows")
    return out


def discover_splits(root: str | Path, val_fraction: float = 0.15, test_fraction: float = 0.15,
                    seed: int = 0) -> dict[str, list[SegPair]]:
    """``{"train": [...], "val": [...], "test": [...]}`` from a folder layout or a CSV (module doc)."""
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        found = pairs_from_csv(root)
    elif (root / "train").is_dir():
        found = {s: pairs_from_folders(root / s / "images", root / s / "masks") for s in SPLITS if (root / s).is_dir()}
    elif (root / "images").is_dir() or (root / "masks").is_dir():
        found = {"all": pairs_from_folders(root / "images", root / "masks")}
    elif not root.exists():
        raise SegDataError(f"segmentation data {root} does not exist")
    else:
        raise SegDataError(f"{root}: expected images/ + masks/, train/ val/ test/ subfolders, or a CSV image,mask[,split]")
    pool = found.pop("all", [])
    rng = np.random.default_rng(seed)
    if pool:
        order = rng.permutation(len(pool))
        pool = [pool[i] for i in order]
        n_test = int(round(test_fraction * len(pool))) if "test" not in found else 0
        n_val = int(round(val_fraction * len(pool))) if "val" not in found else 0
        if len(pool) - n_test - n_val < 1:
            raise SegDataError(f"{root}: {len(pool)} image(s) are too few to split into train/val/test")
        found.setdefault("test", []).extend(pool[:n_test])
        found.setdefault("val", []).extend(pool[n_test:n_test + n_val])
        found.setdefault("train", []).extend(pool[n_test + n_val:])
    if not found.get("train"):
        raise SegDataError(f"{root}: no training images")
    for split in SPLITS:
        found.setdefault(split, [])
    return found


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise SegDataError(f"{path}: cannot read image ({exc})") from None


def read_mask(path: str | Path) -> np.ndarray:
    """(H, W) uint8 class indices from a single-channel (L/P/I) PNG; grey RGB is accepted."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (OSError, ValueError) as exc:
        raise SegDataError(f"{path}: cannot read mask ({exc})") from None
    if arr.ndim == 3:
        if arr.shape[2] in (3, 4) and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
            arr = arr[..., 0]
        else:
            raise SegDataError(f"{path}: a mask must be one channel of class indices (0 = background), not a colour image")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.max(initial=0) > 255 or arr.min(initial=0) < 0:
        raise SegDataError(f"{path}: class indices must be in 0..254 (255 = ignore)")
    return arr.astype(np.uint8)


def load_pair(pair: SegPair) -> tuple[np.ndarray, np.ndarray]:
    image, mask = read_image(pair.image), read_mask(pair.mask)
    if image.shape[:2] != mask.shape:
        raise SegDataError(f"{pair.mask}: mask is {mask.shape[1]}×{mask.shape[0]} px but image {pair.image} is "
                           f"{image.shape[1]}×{image.shape[0]} px; masks must match their image pixel for pixel")
    return image, mask


def check_pairs(pairs: Sequence[SegPair]) -> None:
    """Check every pair's image and mask open and have the same size (headers only, no decoding),
    so a bad file is reported before training starts, with all offenders listed."""
    problems = []
    for pair in pairs:
        try:
            with Image.open(pair.image) as im:
                isize = im.size
            with Image.open(pair.mask) as mk:
                msize = mk.size
        except (OSError, ValueError) as exc:
            problems.append(f"{pair.image.name}: cannot open ({exc})")
            continue
        if isize != msize:
            problems.append(f"{pair.mask}: mask {msize[0]}×{msize[1]} px vs image {isize[0]}×{isize[1]} px")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise SegDataError(f"{len(problems)} bad image/mask pair(s): " + "; ".join(problems[:5]) + more +
                           ". Masks must match their image pixel for pixel; fix or remove these files")


def infer_num_classes(pairs: Sequence[SegPair]) -> int:
    """1 + the largest class index in the masks (at least 2)."""
    top = 0
    for pair in pairs:
        mask = read_mask(pair.mask)
        valid = mask[mask != IGNORE_INDEX]
        top = max(top, int(valid.max(initial=0)))
    return max(2, top + 1)


def select_fraction(pairs: Sequence[SegPair], fraction: float, seed: int = 0) -> list[SegPair]:
    """A seeded subset of ``fraction`` of the images (at least one); nested across fractions for one seed
    (the 1 % subset lies inside the 10 % subset)."""
    if not 0 < fraction <= 1:
        raise SegDataError(f"label fraction must be in (0, 1], got {fraction}")
    ordered = sorted(pairs, key=lambda p: p.name)
    order = np.random.default_rng(seed).permutation(len(ordered))
    n = max(1, int(round(fraction * len(ordered))))
    return [ordered[i] for i in sorted(order[:n])]


class PatchDataset(Dataset):
    """Random P×P patches from image/mask pairs, with foreground oversampling.

    With probability ``fg_fraction`` a patch is centred (± P/4) on a random foreground pixel, else
    placed uniformly. Images smaller than P are reflect-padded (mask padded with 255 = ignore).
    Flips and 90° rotations when ``augment``. Sampling is a pure function of (seed, epoch, index).
    Images are loaded lazily and kept in a small LRU cache (per worker).
    """

    def __init__(self, pairs: Sequence[SegPair], patch_size: int, samples_per_epoch: int, fg_fraction: float = 0.5,
                 augment: bool = True, seed: int = 0, cache_size: int = 32):
        if not pairs:
            raise SegDataError("no image/mask pairs to sample patches from")
        if patch_size < 8:
            raise SegDataError(f"patch_size must be >= 8, got {patch_size}")
        self.pairs, self.patch_size, self.n = list(pairs), int(patch_size), int(samples_per_epoch)
        self.fg_fraction, self.augment, self.seed, self.epoch = float(fg_fraction), augment, int(seed), 0
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_size = cache_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def _load(self, idx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if idx in self._cache:
            self._cache.move_to_end(idx)
            return self._cache[idx]
        image, mask = load_pair(self.pairs[idx])
        p = self.patch_size
        ph, pw = max(0, p - mask.shape[0]), max(0, p - mask.shape[1])
        if ph or pw:
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(mask.shape) > 1 else "edge")
            mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
        fg = np.flatnonzero((mask > 0) & (mask != IGNORE_INDEX))
        self._cache[idx] = (image, mask, fg)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return image, mask, fg

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.epoch, int(i)))
        image, mask, fg = self._load(int(rng.integers(len(self.pairs))))
        p = self.patch_size
        h, w = mask.shape
        if fg.size and rng.random() < self.fg_fraction:
            cy, cx = divmod(int(fg[rng.integers(fg.size)]), w)
            jitter = rng.integers(-(p // 4), p // 4 + 1, size=2)
            y = int(np.clip(cy - p // 2 + jitter[0], 0, h - p))
            x = int(np.clip(cx - p // 2 + jitter[1], 0, w - p))
        else:
            y, x = int(rng.integers(h - p + 1)), int(rng.integers(w - p + 1))
        img, msk = image[y:y + p, x:x + p], mask[y:y + p, x:x + p]
        if self.augment:
            k = int(rng.integers(4))
            img, msk = np.rot90(img, k), np.rot90(msk, k)
            if rng.random() < 0.5:
                img, msk = img[:, ::-1], msk[:, ::-1]
        img_t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255)
        return img_t, torch.from_numpy(np.ascontiguousarray(msk)).long()
