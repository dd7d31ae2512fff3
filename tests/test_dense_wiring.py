"""Scale-aware crops and the dense branch inside the engine: config sections, the data pipeline's
views and geometries, and short training runs of SimCLR / MoCo v2 / SGCL with the dense term."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, shared_path
from preprocessing.h5format import write_patch_file
from sgcl.config import load_config
from sgcl.methods.config import MethodConfig, build_method
from sgcl.methods.dense import DenseMethod
from sgcl.models.backbone import create_backbone, load_backbone
from sgcl.train.config import PretrainConfig
from sgcl.train.trainer import Trainer, build_sample_transform
from sgcl.transforms.geometry import render_view
from sgcl.transforms.scale_aware import SmallWindowCrop


@pytest.fixture(scope="module")
def h5_dir(tmp_path_factory) -> str:
    """16 real 56-px H&E patches (4 × 4 grid) cut from the NCT-CRC sample tiles."""
    tiles = sorted(shared_path("patches", "nct-crc-he-samples").glob("*.tif"))
    imgs = []
    for t in tiles[:4]:
        a = np.array(Image.open(t).convert("RGB"))
        imgs += [a[r * 56 : (r + 1) * 56, c * 56 : (c + 1) * 56] for r in range(2) for c in range(2)]
    imgs = np.stack(imgs)
    grid = np.array([(i % 4, i // 4) for i in range(16)], np.int32)
    out = tmp_path_factory.mktemp("h5")
    write_patch_file(out / "slide.h5", imgs, grid.astype(np.int64) * 56, grid)
    return str(out)


def test_small_window_views_from_the_engine_pipeline_carry_exact_geometry():
    cfg = load_config(PretrainConfig, None, ["aug.crop=small_window", "aug.global_size=64", "aug.small_window.rho=0.5",
                                             "aug.small_window.placement=proximity", "aug.gpu=true", "aug.local_crop=small_window",
                                             "aug.local_size=32"])
    transform = build_sample_transform(cfg.aug, num_views=2, needs_local=True)
    assert isinstance(transform.builder.policy, SmallWindowCrop) and transform.builder.policy.out_size is None
    ys, xs = np.mgrid[0:96, 0:96]
    img = np.stack([xs, ys, (xs + ys) % 256], -1).astype(np.uint8)  # every pixel encodes its position
    rng = np.random.default_rng(0)
    for _ in range(10):
        out = transform(img, rng)
        for view, geom in zip(out["views"], out["geoms"]):
            assert tuple(view.shape) == (3, 32, 32)  # native: rho·L = 32 px, no resize
            np.testing.assert_array_equal(view.permute(1, 2, 0).numpy(), render_view(img, geom.numpy()))
        assert tuple(out["local"][0].shape[-2:]) == (16, 16)  # local crops: rho · local_size, native


def _cfg(h5_dir: str, tmp_path, method: str, extra: list[str]) -> PretrainConfig:
    overrides = [
        f"data.h5_dir={h5_dir}", "data.batch_size=4", "data.workers=0", "data.pin_memory=false",
        "model.backbone=resnet18", "model.channels_last=false", f"method.name={method}",
        "aug.crop=small_window", "aug.global_size=64", "aug.small_window.rho=0.5", "aug.small_window.resolution=zoom",
        "aug.local_size=32", "method.dense.enabled=true", "method.dense.n_anchors=8", "method.dense.weight=0.5",
        "method.dense.hidden_dim=32", "method.dense.out_dim=16", "method.proj_hidden_dim=64", "method.proj_dim=16",
        "method.moco.queue_size=32", "method.sgcl.num_negatives=8", "method.sgcl.nei_k=4", "method.sgcl.kmeans_clusters=2",
        "method.sgcl.kmeans_runs=1", "train.max_steps=2", "train.epochs=1", "train.device=cpu", "train.progress=false",
        f"train.out_dir={tmp_path / method}", "train.log_every=1", "optim.lr=0.01",
    ]
    return load_config(PretrainConfig, None, overrides + extra)


@pytest.mark.parametrize("method,extra", [
    ("simclr", ["method.dense.sampler=arco_sag"]),
    ("moco_v2", ["method.dense.sampler=igu", "aug.small_window.placement=random"]),
    ("sgcl", ["method.dense.sampler=arco_sg", "method.dense.arco_mode=virtual"]),
])
def test_training_with_dense_term_and_small_windows(h5_dir, tmp_path, method, extra):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = _cfg(h5_dir, tmp_path, method, extra)
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        assert isinstance(trainer.method, DenseMethod) and trainer.method.num_views == 2
        rows = trainer.fit()
    finally:
        trainer.close()
    assert len(rows) == 2
    for row in rows:
        assert math.isfinite(row["loss"]) and math.isfinite(row["loss_dense"]) and row["loss_dense"] > 0
        assert row["dense_pairs"] >= 2
    model, info = load_backbone(str(tmp_path / method / "export"))  # the backbone exports as a plain timm model
    assert info["model_name"] == "resnet18"


def test_dense_wrapper_reuses_the_base_feature_maps_and_adds_the_weighted_term():
    torch.manual_seed(0)
    cfg = MethodConfig(name="simclr", proj_hidden_dim=32, proj_dim=16)
    cfg.dense.enabled, cfg.dense.weight, cfg.dense.n_anchors = True, 2.0, 8
    method = build_method(cfg, create_backbone("resnet18"))
    assert isinstance(method, DenseMethod)
    calls = []
    inner = type(method.backbone).forward_features
    type(method.backbone).forward_features = lambda self, x: (calls.append(x.shape[0]), inner(self, x))[1]
    try:
        x1, x2 = torch.randn(3, 3, 128, 128), torch.randn(3, 3, 128, 128)  # 4 x 4 feature maps
        g = torch.tensor([[0, 0, 128, 128, 128, 128, 0, 0]] * 3, dtype=torch.float32)
        out = method({"views": [x1, x2], "geoms": [g, g]}, 0, 0)
    finally:
        type(method.backbone).forward_features = inner
    assert calls == [6]  # SimCLR's one pass over both views; no extra backbone pass for the dense term
    assert float(out["dense_pairs"]) == 24  # 8 anchors x 3 images
    assert float(out["loss"].detach()) == pytest.approx(float(out["loss_instance"]) + 2.0 * float(out["loss_dense"]), rel=1e-5)
    out["loss"].backward()
    assert method.dense.head.net[0].weight.grad is not None
    # config off: the plain method
    cfg.dense.enabled = False
    assert not isinstance(build_method(cfg, create_backbone("resnet18")), DenseMethod)


def test_shipped_scale_and_dense_configs_load():
    files = sorted((REPO / "configs" / "pretrain").glob("scale_*.yaml")) + sorted((REPO / "configs" / "pretrain").glob("dense_*.yaml"))
    assert len(files) >= 4
    for f in files:
        cfg = load_config(PretrainConfig, f)
        assert cfg.aug.crop == "small_window" or cfg.method.dense.enabled, f
        assert yaml.safe_load(f.read_text())
        transform = build_sample_transform(cfg.aug, 2, cfg.method.name == "sgcl", cfg.method.dense)
        assert (transform.guide is not None) == (cfg.method.dense.sampler == "igu"), f


def test_stop_and_resume_with_dense_term_is_exact(h5_dir, tmp_path):
    torch.set_num_threads(1)
    extra = ["method.dense.sampler=arco_sag", "train.max_steps=3", "train.ckpt_every=100", "train.export=false"]
    full = Trainer(_cfg(h5_dir, tmp_path / "full", "simclr", extra))
    rows_full = full.fit()
    full.close()
    first = Trainer(_cfg(h5_dir, tmp_path / "split", "simclr", extra))
    first.fit(stop_after_steps=2)
    first.close()
    resumed = Trainer(_cfg(h5_dir, tmp_path / "split", "simclr", extra))  # auto-resume from last.pt
    rest = resumed.fit()
    resumed.close()
    assert [r["step"] for r in rest] == [3]
    ref = {r["step"]: r for r in rows_full}[3]
    for key in ("loss", "loss_dense", "dense_pairs"):
        assert rest[0][key] == ref[key], key
