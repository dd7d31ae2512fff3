"""Patient-level folds for MIL: every slide of a patient is on one side of every split.

Outer folds come from :func:`evaluation.crossval.make_folds` over the slides with the patient as the
group: a stratified patient k-fold (patients dealt class by class on their majority label), or
leave-one-patient-out when there are no more patients than folds. Inside each fold's training part,
one inner patient fold (about ``val_fraction`` of the patients, stratified the same way) is the
validation split for early stopping and model choice. A CSV ``split`` column replaces all of this
by one fold with its own train/val/test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from evaluation.crossval import make_folds


@dataclass
class Fold:
    fold: int
    train: np.ndarray   # slide indices
    val: np.ndarray
    test: np.ndarray
    scheme: str


def patient_folds(labels: Sequence[int], patients: Sequence[str], k: int = 5, val_fraction: float = 0.2,
                  seed: int = 0, splits: Sequence[str] | None = None) -> list[Fold]:
    """The folds of a cohort (module doc); raises ``ValueError`` when there are fewer than 2 patients."""
    labels = np.asarray(labels, np.int64)
    patients = np.asarray([str(p) for p in patients])
    if splits is not None:
        s = np.asarray(splits)
        return [Fold(0, np.flatnonzero(s == "train"), np.flatnonzero(s == "val"), np.flatnonzero(s == "test"),
                     "given (split column)")]
    if len(set(patients.tolist())) < 2:
        raise ValueError("cross-validation needs at least 2 patients; add a patient column or more slides")
    outer, scheme = make_folds(labels, patients, max_folds=int(k), seed=seed)
    folds = []
    for f in np.unique(outer):
        test = np.flatnonzero(outer == f)
        rest = np.flatnonzero(outer != f)
        val = np.zeros(0, np.int64)
        n_rest = len(set(patients[rest].tolist()))
        if val_fraction > 0 and n_rest >= 2:
            n_inner = min(n_rest, max(2, int(round(1.0 / val_fraction))))
            inner, _ = make_folds(labels[rest], patients[rest], max_folds=n_inner, seed=seed + 1000 + int(f))
            val = rest[inner == 0]
        train = np.setdiff1d(rest, val)
        folds.append(Fold(int(f), train, val, test, scheme))
    return folds


def check_patient_disjoint(folds: Sequence[Fold], patients: Sequence[str]) -> None:
    """Raise ``AssertionError`` if a patient is on two sides of a fold or in two test folds."""
    patients = np.asarray([str(p) for p in patients])
    seen_test: dict[str, int] = {}
    for f in folds:
        sides = [set(patients[f.train].tolist()), set(patients[f.val].tolist()), set(patients[f.test].tolist())]
        for a in range(3):
            for b in range(a + 1, 3):
                both = sides[a] & sides[b]
                assert not both, f"fold {f.fold}: patient(s) {sorted(both)[:3]} on two sides"
        for p in sides[2]:
            assert p not in seen_test, f"patient {p} in test folds {seen_test[p]} and {f.fold}"
            seen_test[p] = f.fold
