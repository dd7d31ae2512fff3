"""`sgcl eval mil`: planted-instance bags (ABMIL and CLAM-SB separate them and attend to the planted
patches), patient-level folds, the split column, CLAM/TRIDENT feature folders, bad input (exit 2), and a
real-data pipeline check on the osteosarcoma images treated as small slides."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import torch

from evaluation.mil.cli import main as mil_main
from evaluation.mil.data import find_feature_files, load_cohort, read_bag
from evaluation.mil.folds import check_patient_disjoint, patient_folds
from evaluation.mil.scores import load_mil_config, patch_scores

torch.set_num_threads(1)
D = 16
FAST = ["progress=false", "report.bootstrap=50", "train.epochs=8", "train.lr=0.003", "train.patience=4",
        "model.hidden_dim=32", "model.attention_dim=16", "model.dropout=0.0"]


def _write_h5(path: Path, x: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=x)
        f.create_dataset("coords", data=np.stack([np.arange(len(x)) * 256, np.zeros(len(x))], 1).astype(np.int64))


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def planted_cohort(root: Path, n_bags: int = 40, n: int = 30, n_planted: int = 3, seed: int = 0,
                   layout: str = "h5_files") -> tuple[Path, Path, dict[str, np.ndarray]]:
    """Background instances from N(0, I); a positive bag has ``n_planted`` instances of a distinct
    cluster at random positions. Two slides per patient. Returns (features dir, CSV, planted indices)."""
    rng = np.random.default_rng(seed)
    centre = np.zeros(D, np.float32)
    centre[:4] = 3.0
    feats, rows, planted = root / "feats", [], {}
    for b in range(n_bags):
        x = rng.normal(size=(n, D)).astype(np.float32)
        label = b % 2
        sid = f"slide{b:03d}"
        if label:
            idx = rng.choice(n, n_planted, replace=False)
            x[idx] = centre + 0.5 * rng.normal(size=(n_planted, D))
            planted[sid] = np.sort(idx)
        if layout == "pt_files":
            (feats / "pt_files").mkdir(parents=True, exist_ok=True)
            torch.save(torch.from_numpy(x), feats / "pt_files" / f"{sid}.pt")
        else:
            _write_h5(feats / layout / f"{sid}.h5", x)
        # slides 2k and 2k+1 share patient k (labels alternate, so a patient has both classes)
        rows.append({"slide_id": sid, "label": "tumour" if label else "normal", "patient": f"p{b // 2}"})
    return feats, _write_csv(root / "slides.csv", rows), planted


def _run(tmp_path: Path, feats: Path, labels: Path, *extra: str, name: str = "out") -> dict:
    out = tmp_path / name
    assert mil_main(["--features", str(feats), "--labels", str(labels), "--out", str(out), *FAST, *extra]) == 0
    return json.loads((out / "results.json").read_text())


def test_abmil_finds_planted_instances(tmp_path):
    feats, labels, planted = planted_cohort(tmp_path)
    r = _run(tmp_path, feats, labels, "--model", "abmil", "cv.folds=3")
    assert r["pooled"]["auroc_ovr"]["value"] >= 0.95, r["pooled"]
    assert r["pooled"]["auroc_ovr"]["low"] <= r["pooled"]["auroc_ovr"]["value"] <= r["pooled"]["auroc_ovr"]["high"]
    out = tmp_path / "out"
    for name in ("results.json", "config.json", "metrics.csv", "predictions.csv", "confusion.csv", "roc.png",
                 "confusion.png", "fold_0/model.pt", "fold_0/history.csv", "fold_0/predictions.csv"):
        assert (out / name).is_file(), name
    state = torch.load(out / "fold_0" / "model.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    assert load_mil_config(out)["classes"] == ["normal", "tumour"]
    with open(out / "predictions.csv") as fh:
        preds = list(csv.DictReader(fh))
    assert sorted(p["slide_id"] for p in preds) == [f"slide{b:03d}" for b in range(40)]  # each slide once, out of fold
    hits = 0
    for sid, idx in planted.items():
        x = read_bag(feats / "h5_files" / f"{sid}.h5").numpy()
        s = patch_scores(out, x)
        assert s["attention"].shape == (30,) and s["attention"].dtype == np.float32
        assert abs(float(s["attention"].sum()) - 1) < 1e-4
        assert s["logits_tumour"].shape == (30,)
        hits += int(np.argmax(s["attention"]) in idx)
    assert hits == len(planted), f"top attention on a planted instance in {hits}/{len(planted)} positive bags"
    one = patch_scores(out, x, fold=1)
    assert set(one) == set(s) and not np.allclose(one["attention"], s["attention"])


def test_clam_sb_and_mean_pooling(tmp_path):
    feats, labels, planted = planted_cohort(tmp_path, seed=1)
    r = _run(tmp_path, feats, labels, "--model", "clam_sb", "cv.folds=2", "model.k_sample=3", "model.inst_loss=svm",
             name="clam")
    assert r["pooled"]["auroc_ovr"]["value"] >= 0.95, r["pooled"]
    sid = next(iter(planted))
    s = patch_scores(tmp_path / "clam", read_bag(feats / "h5_files" / f"{sid}.h5").numpy())
    assert {"attention", "logits_tumour", "instance_tumour", "instance_normal"} <= set(s)
    assert np.argmax(s["attention"]) in planted[sid]
    r = _run(tmp_path, feats, labels, "--model", "mean", "cv.folds=2", "report.plots=false", name="mean")
    assert r["model"] == "mean" and len(r["per_fold"]) == 2
    s = patch_scores(tmp_path / "mean", np.zeros((5, D), np.float32))
    assert np.allclose(s["attention"], 0.2) and s["logits_normal"].shape == (5,)


def test_patient_folds_never_split_a_patient():
    rng = np.random.default_rng(0)
    for trial in range(150):
        n = int(rng.integers(6, 80))
        n_pat = int(rng.integers(2, n + 1))
        patients = [f"p{v}" for v in rng.integers(0, n_pat, n)]
        labels = rng.integers(0, int(rng.integers(2, 5)), n)
        folds = patient_folds(labels, patients, k=int(rng.integers(2, 8)), val_fraction=float(rng.choice([0, 0.2, 0.3])),
                              seed=trial)
        check_patient_disjoint(folds, patients)
        test = np.concatenate([f.test for f in folds])
        assert sorted(test.tolist()) == list(range(n)), "every slide is tested exactly once"
        for f in folds:
            assert len(np.intersect1d(f.train, f.val)) == 0
            assert sorted(np.concatenate([f.train, f.val, f.test]).tolist()) == list(range(n))


def test_split_column_is_used(tmp_path):
    feats, labels, _ = planted_cohort(tmp_path, n_bags=24)
    with open(labels) as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        k = int(r["patient"][1:])
        r["split"] = "test" if k % 4 == 0 else ("val" if k % 4 == 1 else "train")
    _write_csv(labels, rows)
    r = _run(tmp_path, feats, labels, "--model", "mean", "report.plots=false")
    assert r["folds"]["scheme"].startswith("given") and len(r["per_fold"]) == 1
    cfg = load_mil_config(tmp_path / "out")
    for side in ("train", "val", "test"):
        assert sorted(cfg["fold_slides"]["0"][side]) == sorted(x["slide_id"] for x in rows if x["split"] == side)


def test_clam_pt_files_and_trident_folders(tmp_path):
    feats, labels, _ = planted_cohort(tmp_path / "clam", n_bags=12, layout="pt_files")
    files = find_feature_files(feats)
    assert len(files) == 12 and all(p.suffix == ".pt" for p in files.values())
    _run(tmp_path, feats, labels, "--model", "abmil", "cv.folds=2", "train.epochs=1", "report.plots=false",
         "data.max_patches_per_bag=10", name="o1")
    for path in (files["slide001"], feats / "pt_files" / "slide001.pt"):
        assert read_bag(path).shape == (30, D)
        a, b = (read_bag(path, 10, np.random.default_rng(s)) for s in (0, 0))
        assert a.shape == (10, D) and torch.equal(a, b) and a.dtype == torch.float32
    job = tmp_path / "trident" / "20x_256px_0px_overlap"
    feats_t, labels_t, _ = planted_cohort(tmp_path / "trident", n_bags=12, layout="x")
    job.mkdir(parents=True)
    (feats_t / "x").rename(job / "features_uni_v1")
    assert len(find_feature_files(job)) == 12 and len(find_feature_files(job / "features_uni_v1")) == 12
    _run(tmp_path, job, labels_t, "--model", "mean", "cv.folds=2", "train.epochs=1", "report.plots=false",
         "data.max_patches_per_bag=10", name="o2")
    x = read_bag(job / "features_uni_v1" / "slide001.h5", 10, np.random.default_rng(0))
    assert x.shape == (10, D)


def test_bad_input_exits_2_naming_the_problem(tmp_path, capsys):
    feats, labels, _ = planted_cohort(tmp_path, n_bags=8)
    out = ["--out", str(tmp_path / "bad"), *FAST]

    def err(csv_rows=None, feats_dir=feats, extra=()):
        path = labels if csv_rows is None else _write_csv(tmp_path / "bad.csv", csv_rows)
        assert mil_main(["--features", str(feats_dir), "--labels", str(path), *out, *extra]) == 2
        return capsys.readouterr().err

    rows = [{"slide_id": f"slide{b:03d}", "label": "ab"[b % 2], "patient": f"p{b}"} for b in range(8)]
    assert "'ghost'" in err(rows + [{"slide_id": "ghost", "label": "a", "patient": "px"}])
    assert "only one class" in err([dict(r, label="a") for r in rows])
    assert "no column 'label'" in err([{"slide_id": r["slide_id"], "diagnosis": r["label"]} for r in rows])
    assert "data.label_column" in err(extra=["data.label_column=diagnosis"])
    _write_h5(feats / "h5_files" / "slide007.h5", np.zeros((5, D + 1), np.float32))
    msg = err()
    assert "feature dimensions differ" in msg and "slide007.h5" in msg
    assert "does not exist" in err(feats_dir=tmp_path / "nowhere")
    assert mil_main(["--labels", str(labels), *out]) == 2
    assert "--features" in capsys.readouterr().err


def _osteo_features(src: Path, dest: Path) -> Path:
    """Each 1024² osteosarcoma image as a 'slide' of 16 patches (256 px, downsampled to 64 px), features from a
    random-init timm test_resnet (seed 0) written as h5_files/<image>.h5; returns the labels CSV."""
    import timm
    from PIL import Image

    torch.manual_seed(0)
    enc = timm.create_model("test_resnet", pretrained=False, num_classes=0).eval()
    rows = []
    for img_path in sorted(src.glob("*/*.jpg")):
        img = Image.open(img_path)
        img.draft("RGB", (256, 256))  # JPEG decoded at 1/4 scale: 16 patches of 256 px become 64 px
        arr = np.asarray(img.convert("RGB").resize((256, 256), Image.BILINEAR), np.float32) / 255.0
        tiles = arr.reshape(4, 64, 4, 64, 3).transpose(0, 2, 4, 1, 3).reshape(16, 3, 64, 64)
        with torch.no_grad():
            x = enc((torch.from_numpy(tiles) - 0.5) / 0.25).numpy()
        _write_h5(dest / "h5_files" / f"{img_path.stem}.h5", x)
        patient = img_path.stem.split("-")[0] + ("-" + img_path.stem.split("-")[1] if img_path.stem.startswith("Case") else "")
        rows.append({"slide_id": img_path.stem, "label": img_path.parent.name, "patient": patient})
    return _write_csv(dest / "slides.csv", rows)


def test_osteosarcoma_pipeline_by_patient(tmp_path):
    from tests.conftest import shared_path

    src = shared_path("patches", "osteosarcoma-sample")
    labels = _osteo_features(src, tmp_path / "feats")
    r = _run(tmp_path, tmp_path / "feats", labels, "--model", "abmil", "train.epochs=3", name="osteo")
    assert r["classes"] == ["Non-Tumor", "Non-Viable-Tumor", "Viable"] and r["n"]["patients"] == 4
    assert r["folds"]["scheme"].startswith("leave-one-group-out") and len(r["per_fold"]) == 4
    assert sorted(p for f in r["per_fold"] for p in f["test_patients"]) == ["Case-3", "Case-4", "Case-48", "P9"]
    for f in r["per_fold"]:
        assert len(f["test_patients"]) == 1 and len(f["val_patients"]) == 1
        assert f["val_patients"] != f["test_patients"]
    cfg = load_mil_config(tmp_path / "osteo")
    cohort = load_cohort(labels, tmp_path / "feats")
    patient = dict(zip(cohort.slides, cohort.patients))
    for sides in cfg["fold_slides"].values():
        groups = [{patient[s] for s in sides[k]} for k in ("train", "val", "test")]
        assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    for name in ("roc.png", "confusion.png", "predictions.csv", "metrics.csv"):
        assert (tmp_path / "osteo" / name).stat().st_size > 0
    assert 0.0 <= r["pooled"]["auroc_ovr"]["value"] <= 1.0
