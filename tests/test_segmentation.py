"""Segmentation fine-tuning: metrics, losses, model, data, training on generated discs, CLI, nuclei task."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.segmentation.cli import main as seg_main
from evaluation.segmentation.config import SegConfig
from evaluation.segmentation.data import (PatchDataset, SegDataError, SegPair, check_pairs, discover_splits,
                                          infer_num_classes, load_pair, read_mask, select_fraction)
from evaluation.segmentation.losses import DiceCELoss, soft_dice_loss
from evaluation.segmentation.metrics import confusion_matrix, dice_iou, segmentation_scores
from evaluation.segmentation.model import build_segmentation_model
from evaluation.segmentation.train import load_checkpoint, train_segmentation
from sgcl.config import load_config
from sgcl.models.backbone import BackboneError, create_backbone, export_backbone
from tests.conftest import shared_path

torch.set_num_threads(1)


def make_disc_dataset(root: Path, n_train: int = 6, n_val: int = 2, n_test: int = 2, size: int = 96, seed: int = 0) -> Path:
    """Bright discs (class 1) on a noisy striped background: a task with a known answer."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = (rng.normal(0.35, 0.08, (size, size, 3)) + 0.1 * np.sin(xx / 3.0)[..., None]).clip(0, 1)
            mask = np.zeros((size, size), np.uint8)
            for _ in range(rng.integers(3, 7)):
                cy, cx, r = rng.integers(8, size - 8), rng.integers(8, size - 8), rng.integers(4, 9)
                mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
            img[mask == 1] = (img[mask == 1] + 0.35).clip(0, 1)
            Image.fromarray((img * 255).astype(np.uint8)).save(root / split / "images" / f"{split}{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{split}{i}.png")
    return root


@pytest.fixture(scope="module")
def discs(tmp_path_factory) -> Path:
    return make_disc_dataset(tmp_path_factory.mktemp("discs"))


# -- metrics and losses ------------------------------------------------------------------------

def test_dice_iou_match_scikit_learn():
    from sklearn.metrics import f1_score, jaccard_score

    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, (50, 60))
    pred = np.where(rng.random((50, 60)) < 0.7, target, rng.integers(0, 3, (50, 60)))
    scores = segmentation_scores(pred, target, 3, exclude_background=False)
    f1 = f1_score(target.ravel(), pred.ravel(), average=None)
    jac = jaccard_score(target.ravel(), pred.ravel(), average=None)
    np.testing.assert_allclose([scores["dice"][f"class_{i}"] for i in range(3)], f1)
    np.testing.assert_allclose([scores["iou"][f"class_{i}"] for i in range(3)], jac)
    no_bg = segmentation_scores(pred, target, 3, exclude_background=True)
    assert no_bg["mean_dice"] == pytest.approx(f1[1:].mean())


def test_confusion_ignores_255_and_absent_classes_are_undefined():
    target = np.array([[0, 1, 255], [1, 1, 0]])
    pred = np.array([[0, 1, 1], [0, 1, 0]])
    cm = confusion_matrix(pred, target, 3)
    assert cm.sum() == 5 and cm[1, 1] == 2 and cm[1, 0] == 1
    scores = dice_iou(cm)
    assert scores["dice"]["class_2"] is None and scores["mean_dice"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="target contains class 4 but num_classes=3"):
        confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 4), 3)
    with pytest.raises(ValueError, match="prediction contains classes outside"):
        confusion_matrix(np.full((2, 2), 3), np.zeros((2, 2)), 3)
    with pytest.raises(ValueError, match="pixels"):
        confusion_matrix(np.zeros((2, 3)), np.zeros((2, 2)), 3)


def test_soft_dice_loss():
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 4:9, 4:9] = 1
    perfect = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 40 - 20
    assert soft_dice_loss(perfect, target) < 1e-4
    assert soft_dice_loss(-perfect, target) > 0.99
    # background excluded: predicting all background scores Dice 0 on the foreground
    all_bg = torch.zeros(2, 2, 16, 16)
    all_bg[:, 0] = 20
    assert soft_dice_loss(all_bg, target, exclude_background=True) > 0.99
    assert soft_dice_loss(all_bg, target, exclude_background=False) < 0.6
    # ignored pixels count in neither term
    ignored = target.clone()
    ignored[:, :, 12:] = 255
    wrong_there = perfect.clone()
    wrong_there[:, :, :, 12:] = -wrong_there[:, :, :, 12:]
    assert soft_dice_loss(wrong_there, ignored) < 1e-4
    logits = torch.randn(2, 2, 16, 16, requires_grad=True)
    DiceCELoss()(logits, target).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="do not match"):
        soft_dice_loss(torch.randn(2, 2, 8, 8), target)


# -- model -------------------------------------------------------------------------------------

def test_exported_encoder_weights_load_into_features_only_model(tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone("test_resnet")
    export_backbone(backbone, "test_resnet", tmp_path / "export")
    model, info = build_segmentation_model(str(tmp_path / "export"), num_classes=3)
    assert info["tensors_loaded"] > 0 and info["model_name"] == "test_resnet"
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        backbone.eval(), model.eval()
        norm = (x - model.mean) / model.std
        deepest = model.encoder(norm)[-1]
        np.testing.assert_allclose(deepest.numpy(), backbone.forward_features(norm).numpy(), atol=1e-5)
        out = model(torch.rand(1, 3, 75, 101))  # any size, logits at full resolution
    assert out.shape == (1, 3, 75, 101)
    with pytest.raises(BackboneError):
        build_segmentation_model(str(tmp_path / "missing" / "backbone.safetensors"), 2)


@pytest.mark.parametrize("name", ["test_convnext", "test_vit"])
def test_other_timm_families_segment_any_size(name, tmp_path):
    """ConvNeXt stages are renamed by features_only (stages_1); ViTs need multiples of the patch size."""
    torch.manual_seed(0)
    export_backbone(create_backbone(name), name, tmp_path / name)
    model, info = build_segmentation_model(str(tmp_path / name), num_classes=2)
    assert info["tensors_loaded"] == len(model.encoder.state_dict())
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 70, 90)).shape == (1, 2, 70, 90)


def test_frozen_encoder_does_not_change(tmp_path):
    torch.manual_seed(0)
    model, _ = build_segmentation_model("test_resnet", num_classes=2, frozen=True)
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    dec_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    assert not model.encoder.training
    x, y = torch.rand(2, 3, 64, 64), torch.randint(0, 2, (2, 64, 64))
    DiceCELoss()(model(x), y).backward()
    opt.step()
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in enc_before.items())  # incl. BN stats
    assert any(not torch.equal(v, model.decoder.state_dict()[k]) for k, v in dec_before.items())


# -- data ----------------------------------------------------------------------------------------

def test_discover_splits_and_label_fractions(discs, tmp_path):
    splits = discover_splits(discs)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert infer_num_classes(splits["train"]) == 2
    pool = [SegPair(Path(f"i{i}.png"), Path(f"m{i}.png"), f"img{i:03d}") for i in range(200)]
    one, ten, full = (select_fraction(pool, f, seed=3) for f in (0.01, 0.1, 1.0))
    assert (len(one), len(ten), len(full)) == (2, 20, 200)
    assert set(p.name for p in one) <= set(p.name for p in ten)  # nested budgets
    assert select_fraction(pool, 0.1, seed=3) == ten and select_fraction(pool, 0.1, seed=4) != ten
    assert len(select_fraction(pool[:5], 0.01)) == 1
    with pytest.raises(SegDataError, match="label fraction"):
        select_fraction(pool, 0.0)
    # a flat images/ + masks/ folder is split by a seeded shuffle
    flat = tmp_path / "flat"
    (flat / "images").mkdir(parents=True)
    (flat / "masks").mkdir()
    for p in splits["train"] + splits["val"]:
        (flat / "images" / p.image.name).write_bytes(p.image.read_bytes())
        (flat / "masks" / p.mask.name).write_bytes(p.mask.read_bytes())
    got = discover_splits(flat, val_fraction=0.25, test_fraction=0.25)
    assert sorted(len(v) for v in got.values()) == [2, 2, 4]
    assert not set(p.name for p in got["train"]) & set(p.name for p in got["test"])


def test_csv_layout(discs, tmp_path):
    rows = [("image", "mask", "split")]
    for split in ("train", "val"):
        for img in sorted((discs / split / "images").iterdir()):
            rows.append((str(img), str(discs / split / "masks" / img.name), split))
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    splits = discover_splits(path)
    assert len(splits["train"]) == 6 and len(splits["val"]) == 2
    with open(path, "a") as fh:
        fh.write(f"{rows[1][0]},nowhere/mask.png,train\n")
    with pytest.raises(SegDataError, match="line 10: mask"):
        discover_splits(path)


def test_bad_data_gives_clear_errors(discs, tmp_path):
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "masks").mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(bad / "images" / "a.png")
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(bad / "images" / "b.png")
    with pytest.raises(SegDataError, match=r"have no mask .*a\.png"):
        discover_splits(bad)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(bad / "masks" / "a.png")
    with pytest.raises(SegDataError, match=r"mask is 40×40 px but image .*a\.png is 50×40 px"):
        load_pair(SegPair(bad / "images" / "a.png", bad / "masks" / "a.png", "a"))
    colour = np.zeros((40, 50, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(bad / "masks" / "b.png")
    with pytest.raises(SegDataError, match="one channel of class indices"):
        read_mask(bad / "masks" / "b.png")
    with pytest.raises(SegDataError, match=r"1 bad image/mask pair\(s\): .*a\.png: mask 40×40 px vs image 50×40"):
        check_pairs([SegPair(bad / "images" / "a.png", bad / "masks" / "a.png", "a")])
    cfg = load_config(SegConfig, None, [f"data={bad}", f"out={tmp_path / 'run'}", "model.encoder=test_resnet"])
    with pytest.raises(SegDataError, match="bad image/mask pair"):  # found before any training
        train_segmentation(cfg, progress=False)
    with pytest.raises(SegDataError, match="does not exist"):
        discover_splits(tmp_path / "nowhere")
    with pytest.raises(SegDataError, match="masks"):
        discover_splits(discs / "train" / "images")


def test_patch_sampler_oversamples_foreground(discs):
    pairs = discover_splits(discs)["train"]
    always = PatchDataset(pairs, 32, 60, fg_fraction=1.0, seed=1)
    never = PatchDataset(pairs, 32, 60, fg_fraction=0.0, seed=1)
    share_always = np.mean([(always[i][1] == 1).any().item() for i in range(60)])
    share_never = np.mean([(never[i][1] == 1).float().mean().item() for i in range(60)])
    share_always_px = np.mean([(always[i][1] == 1).float().mean().item() for i in range(60)])
    assert share_always == 1.0 and share_always_px > share_never
    img, mask = always[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert mask.shape == (32, 32) and mask.dtype == torch.long
    assert torch.equal(always[5][0], always[5][0])  # pure function of (seed, epoch, index)
    always.set_epoch(1)
    img2, _ = always[0]
    assert not torch.equal(img, img2)
    big = PatchDataset(pairs, 128, 4)  # patches larger than the 96-px images are padded with ignore
    assert (big[0][1] == 255).any()


# -- training end to end ---------------------------------------------------------------------------

def _cfg(data: Path, out: Path, *extra: str) -> SegConfig:
    return load_config(SegConfig, None, [f"data={data}", f"out={out}", "model.encoder=test_resnet", "device=cpu",
                                         "train.epochs=3", "train.steps_per_epoch=15", "train.batch_size=4",
                                         "train.patch_size=64", "train.lr=0.003", "train.encoder_lr=0.001",
                                         "infer.save_png=2", *extra])


def test_finetuning_segments_discs_with_high_dice(discs, tmp_path):
    out = tmp_path / "run"
    results = train_segmentation(_cfg(discs, out), progress=False)
    assert results["test"]["mean_dice"] > 0.8, results["test"]
    assert results["test"]["dice"]["class_1"] == results["test"]["mean_dice"]  # background excluded from the mean
    for name in ("results.json", "results.csv", "metrics.json", "metrics.csv", "best.pt", "last.pt", "curves.png",
                 "predictions/test0_mask.png", "predictions/test0_panel.png"):
        assert (out / name).is_file(), name
    history = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["best_epoch"] == max(history, key=lambda r: r["val_mean_dice"])["epoch"]
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class"] for r in rows] == ["background", "class_1", "mean_no_background"]
    mask = np.asarray(Image.open(out / "predictions" / "test0_mask.png"))
    assert mask.shape == (96, 96) and set(np.unique(mask)) <= {0, 1}

    # the best checkpoint reloads to the same predictions
    model, spec = load_checkpoint(out)
    assert spec["num_classes"] == 2 and spec["patch_size"] == 64

    # resuming a finished run trains nothing more and gives the same history
    again = train_segmentation(_cfg(discs, out), progress=False)
    assert json.loads((out / "metrics.json").read_text()) == history
    assert again["test"]["mean_dice"] == pytest.approx(results["test"]["mean_dice"])
    with pytest.raises(ValueError, match="another config"):
        train_segmentation(_cfg(discs, out, "train.seed=5"), progress=False)


def test_cli_train_frozen_fraction_then_predict(discs, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = seg_main(["--encoder", "test_resnet", "--data", str(discs), "--frozen", "--label-fraction", "0.5",
                   "--out", str(out), "--epochs", "1", "--quiet", "train.steps_per_epoch=3", "train.batch_size=2",
                   "train.patch_size=48", "device=cpu", "mpp=0.5"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["frozen"] is True and results["train_images"] == 3 and results["label_fraction"] == 0.5
    big = np.asarray(Image.open(discs / "test" / "images" / "test0.png"))
    big = np.tile(big, (2, 3, 1))
    Image.fromarray(big).save(tmp_path / "big.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rc = seg_main(["predict", "--checkpoint", str(out), "--image", str(tmp_path / "broken.png"), str(tmp_path / "big.png"),
                   "--out", str(tmp_path / "pred")])
    assert rc == 1  # the broken image is reported, the good one still predicted
    items = json.loads((tmp_path / "pred" / "predictions.json").read_text())["items"]
    assert "cannot read image" in items[0]["error"] and items[1]["shape"] == list(big.shape[:2])
    assert np.asarray(Image.open(tmp_path / "pred" / "big_mask.png")).shape == big.shape[:2]
    assert (tmp_path / "pred" / "big_overlay.png").is_file()
    assert seg_main(["--encoder", "test_resnet", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert seg_main(["--data", str(discs), "train.nope=1"]) == 2
    assert "unknown key train.nope" in capsys.readouterr().err


def test_cli_predicts_a_slide_region(discs, tmp_path, demo_slide):
    out = tmp_path / "run"
    assert seg_main(["--encoder", "test_resnet", "--data", str(discs), "--out", str(out), "--epochs", "1", "--quiet",
                     "train.steps_per_epoch=2", "train.batch_size=2", "train.patch_size=48", "mpp=1.0"]) == 0
    assert seg_main(["predict", "--checkpoint", str(out), "--slide", str(demo_slide), "--region", "200,300,600,400",
                     "--out", str(tmp_path / "pred")]) == 0
    meta = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    item = meta["items"][0]
    assert item["mpp"] == 1.0 and item["shape"] == [round(400 * 0.499), round(600 * 0.499)]
    mask = np.asarray(Image.open(tmp_path / "pred" / item["mask"]))
    assert list(mask.shape) == item["shape"]


# -- nuclei task (real H&E, derived labels) ---------------------------------------------------------

def test_nuclei_task_on_real_images(tmp_path, demo_slide):
    from evaluation.segmentation.nuclei_task import build_nuclei_task, derive_nuclei_instances, instances_to_mask

    images = sorted(shared_path("images").glob("he-*"))
    assert len(images) >= 3
    task = build_nuclei_task(tmp_path / "nuclei", images=images, slide=demo_slide, slide_regions=1)
    meta = task.meta
    assert "DERIVED" in meta["labels"] and (task.root / "README.md").is_file()
    assert all(meta["tiles"][s] > 0 for s in ("train", "val", "test"))
    names = {s: {p.name for p in (task.split_dir(s) / "masks").iterdir()} for s in ("train", "val", "test")}
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    for src in meta["sources"]:
        assert src["nuclei"] > 10 and 0.02 < src["foreground_fraction"] < 0.5, src
    splits = discover_splits(task.root)
    image, mask = load_pair(splits["test"][0])
    assert image.shape[:2] == mask.shape and set(np.unique(mask)) <= {0, 1}
    assert sum(read_mask(p.mask).any() for p in splits["train"]) >= len(splits["train"]) // 2
    again = build_nuclei_task(tmp_path / "nuclei", images=images, slide=demo_slide, slide_regions=1)
    assert again.meta == meta  # reused, not rebuilt
    with pytest.raises(FileExistsError):
        build_nuclei_task(tmp_path / "nuclei", images=images[:1], slide=None)

    # nuclei are dark haematoxylin blobs: the derived foreground is darker than the background
    rgb = np.asarray(Image.open(images[0]).convert("RGB"))
    inst = derive_nuclei_instances(rgb)
    fg = instances_to_mask(inst).astype(bool)
    assert rgb[fg].mean() < rgb[~fg].mean() - 30
    # touching instances are separated by background in the class mask
    two = np.zeros((10, 10), np.int32)
    two[2:8, 1:5], two[2:8, 5:9] = 1, 2
    sep = instances_to_mask(two)
    assert sep[4, 4] == 0 or sep[4, 5] == 0
    assert sep[4, 2] == 1 and sep[4, 7] == 1
