"""kNN (faiss = torch = a plain reference), logistic probe (= scikit-learn), few-shot, labels and splits,
and the `sgcl eval` pipeline on the real NCT-CRC tiles."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from evaluation.knn import knn_classify
from evaluation.labels import LabelsError, from_csv, group_split
from evaluation.linear import few_shot, fit_logistic, linear_probe, sample_few_shot
from tests.conftest import shared_path

torch.set_num_threads(1)


def clustered(n: int, d: int, c: int, seed: int, spread: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g) * spread
    y = torch.randint(0, c, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g), y


def test_faiss_and_torch_knn_agree_exactly():
    bank, by = clustered(3000, 64, 7, 0, spread=0.4)  # overlapping classes: many close votes
    q, _ = clustered(500, 64, 7, 1, spread=0.4)
    a = knn_classify(bank, by, q, 7, backend="faiss", batch_size=128)
    b = knn_classify(bank, by, q, 7, backend="torch")
    assert sorted(a) == [10, 20, 100, 200]
    for k in a:
        assert torch.equal(a[k]["pred"], b[k]["pred"]), k
        torch.testing.assert_close(a[k]["proba"], b[k]["proba"])
    # not a degenerate case: k changes some predictions
    assert not torch.equal(a[10]["pred"], a[200]["pred"])


def test_knn_matches_a_plain_reference():
    bank, by = clustered(400, 16, 4, 2, spread=0.5)
    q, _ = clustered(60, 16, 4, 3, spread=0.5)
    k, t = 20, 0.07
    res = knn_classify(bank, by, q, 4, ks=[k], temperature=t)[k]
    bn = (bank / bank.norm(dim=1, keepdim=True)).double().numpy()
    qn = (q / q.norm(dim=1, keepdim=True)).double().numpy()
    for i in range(len(qn)):
        sims = bn @ qn[i]
        nn = np.argsort(-sims)[:k]
        votes = np.zeros(4)
        np.add.at(votes, by.numpy()[nn], np.exp(sims[nn] / t))
        assert res["pred"][i].item() == votes.argmax()
        np.testing.assert_allclose(res["proba"][i].numpy(), votes / votes.sum(), rtol=1e-4)


def test_knn_bad_input():
    bank, by = clustered(50, 8, 2, 0)
    with pytest.raises(ValueError, match="feature dimensions differ.*D=8.*D=9"):
        knn_classify(bank, by, torch.randn(5, 9))
    with pytest.raises(ValueError, match="empty"):
        knn_classify(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), torch.randn(5, 8), 2, backend="torch")


def test_logistic_regression_equals_sklearn():
    from sklearn.linear_model import LogisticRegression

    x, y = clustered(300, 10, 3, 4, spread=0.6)
    l2 = 1e-2
    ours = fit_logistic(x, y, 3, l2=l2, normalize="none", max_iter=1000)
    # ours: mean CE + l2/2 |W|^2  ==  sklearn: C * sum CE + 1/2 |W|^2  with C = 1 / (l2 N)
    sk = LogisticRegression(C=1.0 / (l2 * len(y)), max_iter=5000, tol=1e-10).fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(ours.predict_proba(x).numpy(), sk.predict_proba(x.numpy()), atol=2e-3)


def test_linear_probe_sweep_and_errors():
    x, y = clustered(600, 32, 5, 5, spread=0.8)
    tr, va, te = slice(0, 300), slice(300, 400), slice(400, 600)
    grid = [1e-4, 1e-2, 1.0, 100.0]
    r = linear_probe(x[tr], y[tr], x[va], y[va], x[te], y[te], 5, l2_grid=grid)
    assert r["l2"] in grid and len(r["sweep"]) == 4
    assert r["metrics"]["accuracy"] > 0.8  # well-separated clusters; chance is 0.2
    # the strongest regularisation collapses towards the prior: worse on validation
    scores = {s["l2"]: s["val_balanced_accuracy"] for s in r["sweep"]}
    assert scores[100.0] < max(scores.values())
    with pytest.raises(ValueError, match="validation split is empty"):
        linear_probe(x[tr], y[tr], x[:0], y[:0], x[te], y[te], 5)
    with pytest.raises(ValueError, match="dimensions differ"):
        linear_probe(x[tr], y[tr], x[va, :16], y[va], x[te], y[te], 5)


def test_few_shot_samples_k_per_class_and_reports_mean_std():
    x, y = clustered(400, 16, 4, 6, spread=1.0)
    idx = sample_few_shot(y[:300], 3, seed=0, num_classes=4)
    assert np.bincount(y[:300][idx].numpy(), minlength=4).tolist() == [3, 3, 3, 3]
    assert not np.array_equal(idx, sample_few_shot(y[:300], 3, seed=1, num_classes=4))
    r = few_shot(x[:300], y[:300], x[300:], y[300:], 4, shots=[1, 8], seeds=[0, 1, 2])
    assert len(r["runs"]) == 6
    s = r["summary"]
    accs = [run["accuracy"] for run in r["runs"] if run["shots"] == 1]
    assert s[1]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert s[1]["accuracy"]["std"] == pytest.approx(np.std(accs))
    assert s[8]["accuracy"]["mean"] >= s[1]["accuracy"]["mean"] - 0.05


def test_group_split_keeps_groups_apart_and_stratifies():
    rng = np.random.default_rng(0)
    groups = [f"patient{g}" for g in rng.integers(0, 40, 600)]
    labels = [f"c{int(g[7:]) % 3}" for g in groups]  # label is a property of the patient
    split = group_split(labels, groups, (0.6, 0.2, 0.2), seed=1)
    for g in set(groups):
        assert len({s for s, gg in zip(split, groups) if gg == g}) == 1, g
    for c in ("c0", "c1", "c2"):
        assert {s for s, lab in zip(split, labels) if lab == c} == {"train", "val", "test"}
    frac = np.mean(split == "train")
    assert 0.45 < frac < 0.75
    assert np.array_equal(split, group_split(labels, groups, (0.6, 0.2, 0.2), seed=1))
    assert not np.array_equal(split, group_split(labels, groups, (0.6, 0.2, 0.2), seed=2))


def test_group_split_errors_name_the_class():
    with pytest.raises(LabelsError, match="class 'rare' has only 1 sample"):
        group_split(["a"] * 10 + ["rare"], None, (0.6, 0.2, 0.2))
    with pytest.raises(LabelsError, match="class 'b' occurs in only 1 group"):
        group_split(["a"] * 6 + ["b"] * 6, [f"g{i}" for i in range(6)] + ["p"] * 6, (0.6, 0.2, 0.2))


def test_csv_labels_errors(tmp_path):
    (tmp_path / "x.csv").write_text("path,label\na.png,TUM\nb.png,\n")
    with pytest.raises(LabelsError, match="1 items have no label.*b.png"):
        from_csv(tmp_path / "x.csv")
    (tmp_path / "y.csv").write_text("file,label\na.png,TUM\n")
    with pytest.raises(LabelsError, match="missing column 'path'"):
        from_csv(tmp_path / "y.csv")


# -- the real NCT-CRC tiles through extract -> kNN / linear ---------------------------------
def _augmented_nct(n_aug: int = 8):
    """The nine real tiles, each as 8 dihedral copies (rot90 x flip): 72 images, 9 classes."""
    src = shared_path("patches", "nct-crc-he-samples")
    imgs, labels = [], []
    for f in sorted(src.glob("*.tif")):
        img = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        for r in range(4):
            for flip in range(2):
                if len(imgs) % 8 >= n_aug:
                    continue
                im = np.rot90(img, r)
                imgs.append(np.ascontiguousarray(im[:, ::-1] if flip else im))
                labels.append(f.name.split("-")[0])
    return np.stack(imgs), labels


@pytest.fixture(scope="module")
def nct_h5(tmp_path_factory):
    from preprocessing.h5format import write_patch_file

    imgs, labels = _augmented_nct()
    root = tmp_path_factory.mktemp("nct")
    n = len(imgs)
    coords = np.stack([np.arange(n) * 224, np.zeros(n, np.int64)], 1)
    write_patch_file(root / "patches" / "nct.h5", imgs, coords, np.stack([np.arange(n), np.zeros(n, np.int64)], 1),
                     attrs={"mpp": 0.5})
    # one slide holds every patch, so the split is given (a group-aware split by slide is impossible)
    split = ["train"] * 5 + ["val"] * 2 + ["test"]
    rows = ["slide_id,index,label,split"] + [f"nct,{i},{lab},{split[i % 8]}" for i, lab in enumerate(labels)]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_nct_pipeline_extract_then_knn_and_linear(nct_h5, tmp_path):
    from evaluation import cli, extract
    from evaluation.features import load_features

    out = tmp_path / "feat"
    assert extract.main(["--inputs", str(nct_h5 / "patches"), "--out", str(out), "--encoder", "test_resnet",
                         "num_workers=0", "progress=false"]) == 0
    common = ["data.kind=h5", f"data.h5=[{nct_h5 / 'patches'}]", f"data.csv={nct_h5 / 'labels.csv'}",
              "encoder.spec=test_resnet", "encoder.num_workers=0", "report.bootstrap=50", "progress=false",
              f"encoder.cache={tmp_path / 'cache.npz'}"]
    assert cli.main(["knn", "--out", str(tmp_path / "knn"), *common, "knn.ks=[10,20]"]) == 0
    assert cli.main(["linear", "--out", str(tmp_path / "linear"), *common, "linear.l2_grid=[0.01,1.0]"]) == 0
    # one inference path: the labelled-set features equal the exported MIL features of the same patches
    fs = load_features(tmp_path / "cache.npz")
    import h5py

    with h5py.File(out / "h5_files" / "nct.h5", "r") as f:
        np.testing.assert_allclose(fs.features.numpy(), f["features"][:], rtol=1e-5, atol=1e-5)
    assert fs.slides == ["nct"] * 72 and fs.classes[0] == "ADI"
    res = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert res["n"]["test"] > 0 and res["classes"] == fs.classes and res["feature_dim"] == 96
    assert set(res["knn"]) == {"10", "20"} and res["knn_index"]["index"] == "exact"
    assert 0.0 <= res["knn"]["20"]["accuracy"]["low"] <= res["knn"]["20"]["accuracy"]["high"] <= 1.0
    for name in ("knn_k20_confusion.png", "knn_k20_per_class.png", "features_by_label.png", "features_by_slide.png",
                 "knn_metrics.csv", "knn_k20_confusion.csv"):
        assert (tmp_path / "knn" / name).stat().st_size > 0, name
    lin = json.loads((tmp_path / "linear" / "results.json").read_text())
    assert lin["linear"]["l2"] in (0.01, 1.0) and len(lin["linear"]["sweep"]) == 2
    assert cv2.imread(str(tmp_path / "linear" / "linear_confusion.png")) is not None


def test_eval_cli_bad_input(nct_h5, tmp_path, capsys):
    from evaluation import cli
    from evaluation.features import FeatureSet

    imgs, labels = _augmented_nct()
    # a class with one sample: say which class
    root = tmp_path / "folders"
    for i, (img, lab) in enumerate(zip(imgs, labels)):
        if lab == "TUM" and i % 8:
            continue
        (root / lab).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / lab / f"{i}.png"), img[:, :, ::-1])
    base = ["encoder.spec=test_resnet", "encoder.num_workers=0", "progress=false", f"encoder.cache={tmp_path / 'c.pt'}"]
    assert cli.main(["knn", "--data-root", str(root), "--out", str(tmp_path / "o1"), *base]) == 2
    assert "class 'TUM' has only 1 sample" in capsys.readouterr().err
    # missing labels
    (tmp_path / "l.csv").write_text(f"path,label\n{root / 'ADI' / '0.png'},ADI\n{root / 'ADI' / '1.png'},\n")
    assert cli.main(["knn", "data.kind=csv", f"data.csv={tmp_path / 'l.csv'}", *base]) == 2
    assert "have no label" in capsys.readouterr().err
    # an empty split
    fs = FeatureSet(torch.randn(30, 8), torch.arange(30) % 3, ["a", "b", "c"])
    fs.save(tmp_path / "f.pt")
    assert cli.main(["linear", "--features", str(tmp_path / "f.pt"), "data.split=[0.8,0.0,0.2]",
                     "--out", str(tmp_path / "o2")]) == 2
    assert "the val split is empty" in capsys.readouterr().err
    # mismatched feature dimensions
    FeatureSet(torch.randn(12, 9), torch.arange(12) % 3, ["a", "b", "c"]).save(tmp_path / "t.npz")
    assert cli.main(["knn", "--features", str(tmp_path / "f.pt"), f"data.test_features={tmp_path / 't.npz'}",
                     "--out", str(tmp_path / "o3")]) == 2
    assert "feature dimensions differ" in capsys.readouterr().err
    # a separate test set with matching dims works, and the .pt round-trips with weights_only
    FeatureSet(torch.randn(12, 8), torch.arange(12) % 3, ["a", "b", "c"]).save(tmp_path / "t2.npz")
    assert cli.main(["fewshot", "--features", str(tmp_path / "f.pt"), f"data.test_features={tmp_path / 't2.npz'}",
                     "fewshot.shots=[1,2]", "fewshot.seeds=[0,1]", "--out", str(tmp_path / "o4")]) == 0
    res = json.loads((tmp_path / "o4" / "results.json").read_text())
    assert res["n"]["test"] == 12 and set(res["fewshot"]) == {"1", "2"}


def test_shipped_configs_load_and_seg_is_dispatched(monkeypatch):
    import sys
    import types

    from evaluation import cli
    from evaluation.extract import ExtractConfig
    from sgcl.config import load_config

    repo = Path(__file__).resolve().parents[1]
    for name in ("knn", "linear", "fewshot"):
        cfg = load_config(cli.EvalConfig, repo / "configs" / "eval" / f"{name}.yaml")
        assert cfg.out_dir == f"outputs/eval/{name}"
    assert load_config(cli.EvalConfig, repo / "configs" / "eval" / "knn.yaml").knn.ks == [10, 20, 100, 200]
    assert load_config(ExtractConfig, repo / "configs" / "eval" / "extract.yaml").feature_dtype == "float32"
    seen = {}
    fake = types.ModuleType("evaluation.segmentation.cli")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "evaluation.segmentation", types.ModuleType("evaluation.segmentation"))
    monkeypatch.setitem(sys.modules, "evaluation.segmentation.cli", fake)
    assert cli.main(["seg", "train", "x=1"]) == 0 and seen["argv"] == ["train", "x=1"]
