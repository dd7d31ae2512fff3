"""The evaluation half of the quality benchmark (benchmarks/quality_eval.py): honest folds, hyper-parameters
chosen without the test fold, sane scores, the NuInsSeg split, and a tiny end-to-end fine-tuning run."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO, shared_path
from evaluation.crossval import DEFAULT_K_GRID, make_folds


def _load():
    name = "quality_eval"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "quality_eval.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


qe = _load()


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _synthetic(n_groups=30, per_group=4, n_classes=3, seed=0, signal=True, noise=0.3, dim=16):
    """Groups with one label each; features = one-hot label (+ noise) or pure noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_groups) % n_classes, per_group)
    groups = np.repeat([f"g{i:02d}" for i in range(n_groups)], per_group)
    x = rng.normal(0, noise if signal else 1.0, (len(labels), dim)).astype(np.float32)
    if signal:
        x[np.arange(len(labels)), labels] += 1.0
    task = qe.ClassificationTask("synthetic", labels, [f"c{i}" for i in range(n_classes)], groups, groups,
                                 meta={"split_unit": "group"})
    return task, x


@pytest.fixture(scope="module")
def quick_tasks():
    shared = shared_path()
    for sub in (qe.CRC_DIR, qe.KATHER_DIR, qe.OSTEO_DIR):
        shared_path(*sub.split("/"))
    return qe.load_classification_tasks(shared, mpp=1.0, quick=True)


@pytest.fixture(scope="module")
def seg_task(tmp_path_factory):
    shared = shared_path()
    shared_path(*qe.SPLEEN_DIR.split("/"))
    return qe.build_seg_task(shared, tmp_path_factory.mktemp("quality") / "nuinsseg_spleen", mpp=0.5)


# -- folds ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_groups,max_folds", [(30, 5), (4, 5), (9, 10)])
def test_folds_never_split_a_group_and_cover_every_item_once(n_groups, max_folds):
    task, _ = _synthetic(n_groups=n_groups)
    fold, scheme = make_folds(task.labels, task.groups, max_folds=max_folds, seed=3)
    assert fold.shape == task.labels.shape  # exactly one fold (= one out-of-fold prediction) per item
    for g in np.unique(task.groups):
        assert len(set(fold[task.groups == g])) == 1, f"group {g} split across folds"
    n_folds = len(np.unique(fold))
    assert n_folds == min(n_groups, max_folds)
    assert ("leave-one-group-out" in scheme) == (n_groups <= max_folds)
    if n_groups > max_folds:  # classes with >= 2 groups appear in every training part
        for f in np.unique(fold):
            assert set(task.labels[fold != f]) == set(task.labels)


def test_real_tasks_scale_groups_and_out_of_fold_predictions(quick_tasks):
    assert set(quick_tasks) == {"crc7k", "kather2016", "osteosarcoma"}
    crc, kather, osteo = quick_tasks["crc7k"], quick_tasks["kather2016"], quick_tasks["osteosarcoma"]
    # benchmark scale 1 µm/px: 224 px at 0.5 -> 112; 150 px at 0.495 -> 74; osteosarcoma crops 112 px
    assert crc.patch_px == 112 and kather.patch_px == 74 and osteo.patch_px == 112
    assert all(im.shape == (112, 112, 3) and im.dtype == np.uint8 for im in osteo.images)
    # split units: tile / source slide / patient; crops share their image id
    assert crc.meta["split_unit"] == "tile" and len(set(crc.groups)) == len(crc)
    assert all(g.startswith("CRC-Prim-HE-") for g in kather.groups)
    assert "EMPTY" not in kather.class_names and "EMPTY" in kather.meta["dropped_classes"]
    assert set(osteo.groups) == {"Case-3", "Case-4", "Case-48", "P9"}
    assert len(set(osteo.image_ids)) < len(osteo)
    for image in set(osteo.image_ids):
        assert len(set(osteo.groups[osteo.image_ids == image])) == 1
    for task in quick_tasks.values():
        assert task.meta["caveats"] and task.meta["mpp"] == 1.0 and task.meta["n_items"] == len(task)
        feats = np.random.default_rng(0).normal(size=(len(task), 8)).astype(np.float32)
        res = qe.classification_scores(feats, task, seed=0, n_boot=50)
        json.dumps(res)  # the benchmark stores it as is
        fold = np.asarray(res["folds"]["fold_of_item"])
        for g in np.unique(task.groups):
            assert len(set(fold[task.groups == g])) == 1, f"{task.name}: group {g} on both sides"
        seen = [g for r in res["per_fold"] for g in r["test_groups"]]
        assert sorted(seen) == sorted(set(task.groups.tolist()))  # each group tested exactly once
        for m in ("knn", "linear"):
            pred = np.asarray(res[m]["oof_pred"])
            assert pred.shape == (len(task),) and (pred >= 0).all() and (pred < task.num_classes).all()
            assert len(res[m]["chosen"]) == res["folds"]["n_folds"]
    assert res["ci_unit"] == "image"  # osteosarcoma: 4 patients, the CI resamples images


# -- hyper-parameters are chosen without the test fold ------------------------------------------------------

def test_test_fold_labels_and_features_do_not_change_the_chosen_hyper_parameters():
    task, x = _synthetic(n_groups=24, per_group=3, noise=0.8, seed=1)
    fold, _ = make_folds(task.labels, task.groups, max_folds=4, seed=0)
    base = qe.classification_scores(x, task, seed=0, n_boot=10, folds=fold)
    rng = np.random.default_rng(5)
    for f in range(4):
        te = fold == f
        y2 = task.labels.copy()
        y2[te] = (y2[te] + 1 + rng.integers(0, 2, te.sum())) % 3  # every test label changed
        x2 = x.copy()
        x2[te] = rng.normal(size=x2[te].shape)  # and the test features
        task2 = qe.ClassificationTask("changed", y2, task.class_names, task.groups, task.image_ids)
        res = qe.classification_scores(x2, task2, seed=0, n_boot=10, folds=fold)
        a, b = base["per_fold"][f], res["per_fold"][f]
        for key in ("knn_k", "knn_inner_balanced_accuracy", "linear_l2", "linear_inner_balanced_accuracy"):
            assert a[key] == b[key], (f, key)
    # the selection is real: different k were scored on the inner folds
    assert len(base["per_fold"][0]["knn_inner_balanced_accuracy"]) == len(DEFAULT_K_GRID)


def test_given_folds_that_split_a_group_are_refused():
    task, x = _synthetic(n_groups=6)
    bad = np.arange(len(task)) % 2
    with pytest.raises(ValueError, match="split group"):
        qe.classification_scores(x, task, folds=bad, n_boot=0)


# -- the numbers make sense ----------------------------------------------------------------------------------

def test_label_encoding_features_score_one_and_random_features_score_chance():
    task, x = _synthetic(n_groups=30, per_group=4, n_classes=3, noise=0.1)
    res = qe.classification_scores(x, task, seed=0, n_boot=200)
    assert res["chance"] == pytest.approx(1 / 3)
    for m in ("knn", "linear"):
        ba = res[m]["balanced_accuracy"]
        assert ba["value"] >= 0.97, (m, ba)
        assert ba["low"] <= ba["value"] <= ba["high"]
    assert res["ci_unit"] == "group" and res["n_ci_units"] == 30 and all(res["scored"])
    values = []
    for seed in range(3):
        task, x = _synthetic(n_groups=60, per_group=2, n_classes=3, signal=False, seed=seed)
        res = qe.classification_scores(x, task, seed=seed, n_boot=200)
        values += [res["knn"]["balanced_accuracy"]["value"], res["linear"]["balanced_accuracy"]["value"]]
    assert abs(np.mean(values) - 1 / 3) < 0.08, values
    assert max(values) < 0.55, values


def test_class_missing_from_a_training_fold_is_reported_and_not_scored():
    task, x = _synthetic(n_groups=12, per_group=3, n_classes=3, noise=0.1)
    labels = task.labels.copy()
    labels[task.groups == "g00"] = 3  # class c3 exists in one group only
    task = qe.ClassificationTask("one-group-class", labels, task.class_names + ["c3"], task.groups, task.image_ids)
    x = np.concatenate([x, np.zeros((len(x), 1), np.float32)], 1)
    res = qe.classification_scores(x, task, seed=0, n_boot=50)
    assert res["counts"]["unscorable"] == 3 and "c3" not in res["counts"]["scored_classes"]
    assert not any(np.asarray(res["scored"])[labels == 3]) and sum(res["scored"]) == len(labels) - 3
    assert any(r["missing_train_classes"] == ["c3"] for r in res["per_fold"])
    assert res["chance"] == pytest.approx(1 / 3) and res["knn"]["balanced_accuracy"]["value"] > 0.9


# -- segmentation ------------------------------------------------------------------------------------------

def test_seg_task_split_by_image_and_label_fraction(seg_task):
    from evaluation.segmentation.data import discover_splits, read_mask, select_fraction

    meta = json.loads((seg_task / "task.json").read_text())
    splits = discover_splits(seg_task)
    names = {s: {p.name for p in splits[s]} for s in ("train", "val", "test")}
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    assert sum(len(v) for v in names.values()) == 34
    assert {s: len(v) for s, v in names.items()} == meta["counts"] == {"train": 21, "val": 5, "test": 8}
    mask = read_mask(splits["test"][0].mask)
    assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 1}  # 0.25 -> 0.5 µm/px; 0/255 -> 0/1
    for seed in (0, 1):
        sub = select_fraction(splits["train"], 0.1, seed)
        assert len(sub) == 2 and {p.name for p in sub} <= names["train"]  # round(0.1 * 21)
        assert {p.name for p in sub} <= {p.name for p in select_fraction(splits["train"], 0.5, seed)}  # nested
    before = (seg_task / "task.json").stat().st_mtime_ns
    assert qe.build_seg_task(shared_path(), seg_task, mpp=0.5) == seg_task  # idempotent: reused
    assert (seg_task / "task.json").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="other parameters"):
        qe.build_seg_task(shared_path(), seg_task, mpp=1.0)


@pytest.mark.timeout(120)
def test_segmentation_scores_quick_end_to_end(seg_task, tmp_path):
    out = tmp_path / "seg_r18_10pct"
    res = qe.segmentation_scores("resnet18", seg_task, 0.1, 0, out, qe.QUICK_SEG_BUDGET, n_boot=100)
    assert res["train_images"] == 2 and res["test_images"] == 8 and not res["reused"]
    for key in ("dice_per_image", "dice_pooled"):
        d = res[key]
        assert math.isfinite(d["value"]) and 0 <= d["low"] <= d["value"] <= d["high"] <= 1, (key, d)
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()  # checkpoints removed
    again = qe.segmentation_scores("resnet18", seg_task, 0.1, 0, out, qe.QUICK_SEG_BUDGET, n_boot=100)
    assert again["reused"] and again["dice_pooled"] == res["dice_pooled"]
    with pytest.raises(ValueError, match="another config"):
        qe.segmentation_scores("resnet18", seg_task, 1.0, 0, out, qe.QUICK_SEG_BUDGET)
    with pytest.raises(ValueError, match="unknown segmentation budget"):
        qe.segmentation_scores("resnet18", seg_task, 0.1, 0, tmp_path / "x", {"epochz": 1})
