"""Features of a labelled set, computed with an encoder through the shared inference path and cached.

A :class:`FeatureSet` holds ``features`` (N, D) float32, integer ``labels``, the ``classes`` names,
and optional ``splits``/``groups``/``slides``. It is saved as ``.pt`` (``torch.load(...,
weights_only=True)`` reads it) or ``.npz``; a cache is reused only when it was made from the same
items with the same encoder fingerprint and precision.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from evaluation.labels import LabelledSet, LabelsError, group_split
from sgcl.utils.atomic import atomic_path


@dataclass
class FeatureSet:
    features: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    splits: list[str] | None = None
    groups: list[str] | None = None
    slides: list[str] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.features = torch.as_tensor(self.features).float()
        self.labels = torch.as_tensor(self.labels).long()
        if self.features.ndim != 2:
            raise LabelsError(f"features must be (N, D); got {tuple(self.features.shape)}")
        if self.features.shape[0] != self.labels.shape[0]:
            raise LabelsError(f"{self.features.shape[0]} feature rows but {self.labels.shape[0]} labels")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def ensure_splits(self, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> list[str]:
        """Use the given splits, or make a group-aware stratified one (seeded)."""
        if self.splits is None:
            names = [self.classes[i] for i in self.labels.tolist()]
            self.splits = list(group_split(names, self.groups, tuple(fractions), seed))
        return self.splits

    def split(self, name: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        names = {name} if isinstance(name, str) else set(name)
        if self.splits is None:
            raise LabelsError("no splits: call ensure_splits() first")
        mask = torch.tensor([s in names for s in self.splits], dtype=torch.bool)
        return self.features[mask], self.labels[mask]

    def indices(self, name: str | Sequence[str]) -> np.ndarray:
        names = {name} if isinstance(name, str) else set(name)
        return np.array([i for i, s in enumerate(self.splits or []) if s in names], dtype=np.int64)

    # -- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"features": self.features, "labels": self.labels, "classes": list(self.classes),
                "splits": self.splits, "groups": self.groups, "slides": self.slides, "meta": json.dumps(self.meta)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_path(path) as tmp:
            if path.suffix == ".npz":
                d = self.to_dict()
                arrays = {"features": d["features"].numpy(), "labels": d["labels"].numpy(),
                          "classes": np.array(d["classes"]), "meta": np.array(d["meta"])}
                for k in ("splits", "groups", "slides"):
                    if d[k] is not None:
                        arrays[k] = np.array(d[k])
                with open(tmp, "wb") as fh:
                    np.savez(fh, **arrays)
            else:
                torch.save(self.to_dict(), tmp)
        return path


def load_features(path: str | Path) -> FeatureSet:
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"features file {path} does not exist; compute it with `sgcl eval ... features.cache={path}`")
    if path.suffix == ".npz":
        z = np.load(path, allow_pickle=False)
        d = {k: z[k] for k in z.files}
        opt = {k: [str(v) for v in d[k]] if k in d else None for k in ("splits", "groups", "slides")}
        return FeatureSet(torch.from_numpy(d["features"]), torch.from_numpy(d["labels"]), [str(c) for c in d["classes"]],
                          meta=json.loads(str(d.get("meta", "{}"))), **opt)
    d = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(d, dict) or "features" not in d or "labels" not in d:
        raise LabelsError(f"{path}: not a labelled features file (expected a dict with features, labels, classes)")
    return FeatureSet(d["features"], d["labels"], list(d["classes"]), d.get("splits"), d.get("groups"), d.get("slides"),
                      json.loads(d.get("meta") or "{}"))


def cache_key(lset: LabelledSet, encoder_fp: dict, precision: str) -> str:
    payload = json.dumps({"items": lset.key(), "labels": lset.labels, "encoder": encoder_fp, "precision": precision},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def compute_features(lset: LabelledSet, encoder, batch_size: int = 64, num_workers: int | None = None, device: str = "auto",
                     precision: str = "auto", cache: str | Path | None = None, progress: bool = True) -> FeatureSet:
    """Embed every item of ``lset`` with ``encoder`` (an :class:`evaluation.embedding.Encoder`);
    reuse ``cache`` when it matches, else write it."""
    from evaluation.embedding import embed_dataset

    key = cache_key(lset, encoder.fingerprint(), precision)
    if cache is not None and Path(cache).is_file():
        fs = load_features(cache)
        if fs.meta.get("cache_key") == key:
            return fs
    feats = embed_dataset(encoder, lset, batch_size, num_workers, device, precision,
                          progress="features" if progress else None)
    fs = FeatureSet(torch.from_numpy(feats), torch.from_numpy(lset.label_indices()), lset.classes, lset.splits,
                    lset.groups, lset.slides, meta={"cache_key": key, **encoder.fingerprint(), "source": lset.source})
    if cache is not None:
        fs.save(cache)
    return fs
