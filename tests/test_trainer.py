"""The pretraining engine end to end on real tiled slides: resume exactness, loss going down,
NaN handling, bad input, torchrun DDP on CPU (gloo), export loadable by timm."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sgcl.config import load_config
from sgcl.methods.config import build_method
from sgcl.pretrain import main as pretrain_main
from sgcl.train.checkpoint import CheckpointError, load_checkpoint
from sgcl.train.config import PretrainConfig
from sgcl.train.optim import LARS, build_optimizer, param_groups
from sgcl.train.schedule import scaled_lr, warmup_cosine
from sgcl.train.trainer import NonFiniteLossError, Trainer

from conftest import REPO, shared_path

TINY = REPO / "configs" / "pretrain" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """The two real shared slides tiled by the tiling stage (64-px patches at 1 µm/px)."""
    from preprocessing.config import TileConfig
    from preprocessing.slide_tiler import tile_slide

    out = tmp_path_factory.mktemp("tiles")
    cfg = TileConfig()
    cfg.patch.target_mpp, cfg.patch.patch_size = 1.0, 64
    tile_slide(shared_path("wsi", "cmu-1-small-region.svs"), out / "cmu1.h5", cfg)
    # the TCGA JPEG-2000 slide has no µm/px in its header: state it, as a user would
    tile_slide(shared_path("wsi", "tcga-cr-7395-01a-01-ts1.svs"), out / "tcga.h5", cfg, mpp_override=0.25)
    return out


def tiny_config(tmp_path: Path, data, *overrides: str) -> PretrainConfig:
    torch.set_num_threads(1)
    data_key = f"data.h5_dir={data}" if Path(data).is_dir() else f"data.files=[{data}]"
    return load_config(PretrainConfig, TINY, [data_key, f"train.out_dir={tmp_path}", "train.progress=false", *overrides])


def test_stop_and_resume_gives_the_same_next_steps(tiles, tmp_path):
    # 128 patches / batch 16 = 8 steps per epoch: stop at step 6, the resumed run crosses the epoch
    # boundary (re-clustering, ramp weight) and must match the uninterrupted run exactly.
    common = ("data.batch_size=16", "train.max_steps=11", "train.ckpt_every=100", "train.export=false")
    full = Trainer(tiny_config(tmp_path / "full", tiles / "cmu1.h5", *common)).fit()
    first = Trainer(tiny_config(tmp_path / "split", tiles / "cmu1.h5", *common))
    first.fit(stop_after_steps=6)
    first.close()
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["global_step"] == 6
    resumed = Trainer(tiny_config(tmp_path / "split", tiles / "cmu1.h5", *common))  # auto-resume
    rest = resumed.fit()
    assert [r["step"] for r in rest] == list(range(7, 12))
    by_step = {r["step"]: r for r in full}
    for row in rest:
        ref = by_step[row["step"]]
        assert row["loss"] == ref["loss"], f"step {row['step']}: resumed {row['loss']} != uninterrupted {ref['loss']}"
        for key in ("loss_single", "loss_spatial", "loss_mcrop", "pos_total", "lr"):
            assert row[key] == ref[key], key
    # and the end state (weights, banks, cluster labels) is the same too
    final = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    for key, value in resumed.method.state_dict().items():
        assert torch.equal(value, final[key]), key


def test_short_pretraining_on_real_slides_lowers_the_loss_and_exports_for_timm(tiles, tmp_path):
    import timm

    cfg = tiny_config(tmp_path, tiles, "data.batch_size=32", "train.epochs=4")
    trainer = Trainer(cfg)
    rows = trainer.fit()
    assert len(rows) == trainer.total_steps >= 30
    # w(e) ramps the spatial term up over the epochs, so compare the unweighted objective
    raw = np.array([r["loss_single"] + r["loss_spatial_raw"] + r["loss_mcrop"] for r in rows])
    n = len(raw) // 4
    assert raw[-n:].mean() < raw[:n].mean() - 0.3, f"loss did not go down: first {raw[:n].mean():.3f}, last {raw[-n:].mean():.3f}"
    for key in ("loss_single", "loss_spatial_raw", "loss_mcrop"):
        v = np.array([r[key] for r in rows])
        assert v[-n:].mean() < v[:n].mean(), key
    assert all(r["pos_total"] >= 1 for r in rows)
    # metrics files, config and export
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == len(rows) and {"loss", "lr", "img_per_s", "pos_spatial"} <= set(logged[0])
    assert (tmp_path / "metrics.csv").read_text().startswith("step,epoch,")
    assert json.loads((tmp_path / "config.json").read_text())["model"]["backbone"] == "test_resnet"
    weights = tmp_path / "export" / "backbone.safetensors"
    model = timm.create_model("test_resnet", num_classes=0, checkpoint_path=str(weights)).eval()
    trained = trainer.method.backbone.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(model(x), trained(x), atol=1e-5)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiles, tmp_path):
    def poisoned(cfg, backbone):
        method = build_method(cfg.method, backbone)
        forward = method.forward

        def forward_nan_after_3(batch, epoch, step):
            out = forward(batch, epoch, step)
            if step >= 3:
                out["loss"] = out["loss"] * float("nan")
            return out

        method.forward = forward_nan_after_3
        return method

    cfg = tiny_config(tmp_path, tiles / "cmu1.h5", "train.ckpt_every=2")
    trainer = Trainer(cfg, method_builder=poisoned)
    with pytest.raises(NonFiniteLossError, match=r"not finite at step 3.*last good checkpoint .*last\.pt is kept"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_bad_input_errors_name_the_file(tiles, tmp_path, capsys):
    assert pretrain_main(["--config", str(TINY), "--h5-dir", str(tiles), "--out", str(tmp_path / "o"),
                          "--resume", str(tmp_path / "missing.pt")]) == 2
    assert f"checkpoint {tmp_path / 'missing.pt'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert pretrain_main(["--config", str(TINY), "--h5-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'empty'} contains no .h5 patch file" in capsys.readouterr().err
    corrupt = tmp_path / "o2" / "checkpoints" / "last.pt"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"last\.pt cannot be read"):
        load_checkpoint(corrupt)
    assert pretrain_main(["--config", str(TINY), "--h5-dir", str(tiles), "--out", str(tmp_path / "o"), "optim.nme=sgd"]) == 2
    assert "unknown key optim.nme" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_gloo(tiles, tmp_path):
    import timm

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "sgcl.cli", "pretrain",
           "--config", str(TINY), "--h5-dir", str(tiles), "--out", str(tmp_path), "--max-steps", "3",
           "--batch-size", "8", "train.grad_accum=2", "train.ckpt_every=2", "train.progress=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["world_size"] == 2 and state["global_step"] == 3 and len(state["rng"]) == 2
    # two ranks × 8 × grad_accum 2 = 32 patches per step, 3 steps
    assert state["sampler"]["position"] == 3 * 2 * 8
    model = timm.create_model("test_resnet", num_classes=0, checkpoint_path=str(tmp_path / "export" / "backbone.safetensors"))
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, model.num_features)


def test_schedule_and_optimisers():
    assert scaled_lr(0.03, 512) == pytest.approx(0.06)
    lrs = [warmup_cosine(s, 100, 1.0, warmup_steps=10, min_lr=0.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5, abs=0.02) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    groups = param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3] and groups[1]["weight_decay"] == 0.0
    # LARS: the update of a decayed weight is lr·η·‖w‖/‖g‖·g (no weight decay here)
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = LARS([{"params": [w], "weight_decay": 0.0, "lars": True}], lr=1.0, momentum=0.0, eta=0.01)
    w.grad = torch.tensor([0.0, 10.0])
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0 - 0.01 * 5.0 / 10.0 * 10.0]))
    for name in ("sgd", "lars", "adamw"):
        assert build_optimizer(name, param_groups(model, 0.1), 0.1, 0.1) is not None
    with pytest.raises(ValueError, match="unknown optimiser"):
        build_optimizer("rmsprop", param_groups(model, 0.1), 0.1, 0.1)


def test_moco_v2_with_gpu_augmentation_bf16_workers_and_accumulation(tiles, tmp_path):
    # the throughput path (uint8 crops from 2 loader workers, jitter on the device, bf16 autocast,
    # channels_last, gradient accumulation) runs end to end on the CPU
    cfg = tiny_config(tmp_path, tiles, "method.name=moco_v2", "method.moco.queue_size=64", "aug.gpu=true",
                      "train.precision=bf16", "model.channels_last=true", "data.workers=2", "data.batch_size=8",
                      "train.grad_accum=2", "train.max_steps=3")
    trainer = Trainer(cfg)
    rows = trainer.fit()
    trainer.close()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert trainer.sampler.position == 3 * 2 * 8
    assert (tmp_path / "export" / "backbone.safetensors").is_file()


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_name_real_models(path):
    import timm

    cfg = load_config(PretrainConfig, path, ["data.h5_dir=tiles"])
    assert timm.is_model(cfg.model.backbone), cfg.model.backbone
    assert cfg.method.name in ("sgcl", "moco_v2", "simclr")
    if path.name.startswith("sgcl"):
        assert cfg.method.name == "sgcl"
    if "queue" in path.name:
        assert cfg.method.sgcl.bank == "queue"


def test_train_step_benchmark_runs_in_its_bf16_mode(tmp_path):
    # the --device cuda --precision bf16 path, exercised on the CPU with tiny sizes
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--device", "cpu", "--precision", "bf16",
           "--backbone", "test_resnet", "--batch", "4", "--size", "32", "--bank-rows", "512", "--queue", "64",
           "--steps", "2", "--rounds", "2", "--warmup", "0", "--variants", "moco_v2,sgcl,sgcl-no-inner",
           "--threads", "1", "--gpu-aug", "--loader-seconds", "0.2", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = {r["variant"]: r for r in json.loads(out.read_text())["steps"]}
    assert steps["moco_v2"]["ratio_to_moco_v2"] == 1.0
    assert steps["sgcl"]["views"] == "1x32 + 4x16" and steps["sgcl-no-inner"]["views"] == "1x32"
    assert all(r["step_s"] > 0 for r in steps.values())
    loader = json.loads(out.read_text())["loader"]
    assert loader["sgcl, aug.gpu (crops only)"]["patches_per_s"] > 0
    assert loader["sgcl, aug.gpu (crops only)"]["verdict_sgcl"] in ("keeps up", "is the bottleneck")


def test_explicit_resume_path_continues_from_that_checkpoint(tiles, tmp_path):
    first = ["--config", str(TINY), "--h5-dir", str(tiles / "cmu1.h5"), "--out", str(tmp_path / "a"), "--max-steps", "4",
             "train.ckpt_every=2", "train.export=false", "train.progress=false"]
    assert pretrain_main(first) == 0
    ckpt = tmp_path / "a" / "checkpoints" / "last.pt"
    assert load_checkpoint(ckpt)["global_step"] == 4
    second = ["--config", str(TINY), "--h5-dir", str(tiles / "cmu1.h5"), "--out", str(tmp_path / "b"), "--max-steps", "6",
              "--resume", str(ckpt), "train.progress=false"]
    assert pretrain_main(second) == 0
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 6]
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["global_step"] == 6
    assert (tmp_path / "b" / "export" / "backbone.safetensors").is_file()


def test_ramp_weight_moves_within_an_epoch(tiles, tmp_path):
    """SGCL's w(e) is evaluated at the fractional epoch: a ramp shorter than an epoch (short runs,
    huge cohorts) rises step by step instead of staying at w(0) = 0.0067 for the whole first epoch."""
    cfg = tiny_config(tmp_path, tiles / "tcga.h5", "data.batch_size=16", "train.max_steps=6", "train.log_every=1",
                      "train.export=false", "method.sgcl.rampup_epochs=0.5", "train.health_every=0")
    rows = Trainer(cfg).fit()
    assert all(r["epoch"] == 0 for r in rows)
    w = [r["ramp_weight"] for r in rows]
    assert w[0] == pytest.approx(math.exp(-5), rel=1e-4) and all(b > a for a, b in zip(w, w[1:]))
