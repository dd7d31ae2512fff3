"""Config values are range-checked at load time (issue 13, items 2, 4-7 and the source half of 8).

A bad value exits 2 before any work, naming the dotted key, the value and the allowed range; scientific
notation (``1e-3``, a string to YAML 1.1) is a number everywhere; an error says whether the YAML file or
the command line set the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Optional

import pandas as pd
import pytest
import torch

from _bad_input import BadInput, run_case
from conftest import DEMO_SLIDE, REPO
from sgcl.config import ConfigError, Range, bounded, load_config, validate_config, with_overrides

RANGE = r"is out of range; allowed:"

CASES = [
    # item 2-4: pretraining
    BadInput("pretrain-lr-negative", ("pretrain", "optim.lr=-1"), 2, rf"command line: optim\.lr: -1\.0 {RANGE} > 0"),
    BadInput("pretrain-lr-nan", ("pretrain", "optim.lr=.nan"), 2, rf"optim\.lr: nan {RANGE} > 0"),
    BadInput("pretrain-epochs-negative", ("pretrain", "--epochs", "-1", "--out", "{tmp}/run"), 2,
             rf"train\.epochs: -1 {RANGE} >= 1"),
    BadInput("pretrain-batch-size-0", ("pretrain", "--batch-size", "0"), 2, rf"data\.batch_size: 0 {RANGE} >= 1"),
    BadInput("pretrain-file-value", ("pretrain", "--config", "{tmp}/bad_value.yaml"), 2,
             rf"bad_value\.yaml: optim\.weight_decay: -0\.1 {RANGE} >= 0"),
    BadInput("pretrain-momentum-1", ("pretrain", "method.moco.momentum=1.5"), 2, rf"method\.moco\.momentum: 1\.5 {RANGE} in \[0, 1\]"),
    BadInput("pretrain-dense-anchors", ("pretrain", "method.dense.n_anchors=1"), 2, rf"method\.dense\.n_anchors: 1 {RANGE} >= 2"),
    BadInput("pretrain-sgcl-no-term", ("pretrain", "method.sgcl.self_term=false", "method.sgcl.intra_term=false",
                                       "method.sgcl.inter_term=false", "method.sgcl.inner_term=false"), 2,
             r"method\.sgcl: method sgcl needs at least one of"),
    # item 5: augmentation sizes
    BadInput("aug-global-size-0", ("pretrain", "aug.global_size=0"), 2, rf"aug\.global_size: 0 {RANGE} >= 1"),
    BadInput("aug-local-size-0", ("pretrain", "aug.local_size=0"), 2, rf"aug\.local_size: 0 {RANGE} >= 1"),
    BadInput("aug-scale-reversed", ("pretrain", "aug.global_scale=[0.9, 0.2]"), 2, r"aug\.global_scale: \[0\.9, 0\.2\] must be \(min, max\)"),
    BadInput("aug-hue", ("pretrain", "aug.hue=0.7"), 2, rf"aug\.hue: 0\.7 {RANGE} in \[0, 0\.5\]"),
    BadInput("aug-native-jitter", ("pretrain", "aug.small_window.size_jitter=0.2"), 2,
             r"aug\.small_window\.size_jitter: 0\.2 needs resolution=zoom"),
    # item 6: kNN / linear / fewshot
    BadInput("knn-k-0", ("eval", "knn", "knn.ks=[0]"), 2, rf"knn\.ks\[0\]: 0 {RANGE} >= 1"),
    BadInput("knn-ks-empty", ("eval", "knn", "knn.ks=[]"), 2, r"knn\.ks: give at least one k"),
    BadInput("knn-temperature-0", ("eval", "knn", "knn.temperature=0"), 2, rf"knn\.temperature: 0\.0 {RANGE} > 0"),
    BadInput("linear-l2-negative", ("eval", "linear", "linear.l2_grid=[1e-3,-1e-2]"), 2, rf"linear\.l2_grid\[1\]: -0\.01 {RANGE} >= 0"),
    BadInput("fewshot-shots-0", ("eval", "fewshot", "fewshot.shots=[0, 4]"), 2, rf"fewshot\.shots\[0\]: 0 {RANGE} >= 1"),
    BadInput("eval-split-short", ("eval", "knn", "data.split=[0.5, 0.5]"), 2, r"data\.split: \[0\.5, 0\.5\] must be three fractions"),
    # item 7: tiling, refused before any slide is touched
    BadInput("tile-patch-size-0", ("tile", "{slide}", "--out", "{tmp}/tiles", "--patch-size", "0"), 2,
             rf"patch\.patch_size: 0 {RANGE} >= 1"),
    BadInput("tile-patch-size-negative", ("tile", "{slide}", "--out", "{tmp}/tiles", "patch.patch_size=-5"), 2,
             rf"patch\.patch_size: -5 {RANGE} >= 1"),
    BadInput("tile-target-mpp-0", ("tile", "{slide}", "--out", "{tmp}/tiles", "--target-mpp", "0"), 2,
             rf"patch\.target_mpp: 0\.0 {RANGE} > 0"),
    BadInput("tile-min-tissue-2", ("tile", "{slide}", "--out", "{tmp}/tiles", "--min-tissue", "2"), 2,
             rf"tissue\.min_tissue_fraction: 2\.0 {RANGE} in \[0, 1\]"),
    BadInput("tile-stride-0", ("tile", "{slide}", "--out", "{tmp}/tiles", "--stride", "0"), 2, rf"patch\.stride: 0 {RANGE} >= 1"),
    BadInput("tile-workers-negative", ("tile", "{slide}", "--out", "{tmp}/tiles", "--workers", "-1"), 2, rf"workers: -1 {RANGE} >= 0"),
    BadInput("tile-black-above-white", ("tile", "{slide}", "--out", "{tmp}/tiles", "tissue.black_threshold=230"), 2,
             r"tissue\.black_threshold: 230 must be below white_threshold \(220\)"),
    BadInput("tile-csv-column", ("tile", "{tmp}/slides.csv", "--out", "{tmp}/tiles"), 2,
             rf"slides\.csv, row 2, column `patch\.target_mpp`: patch\.target_mpp: 0\.0 {RANGE} > 0"),
    BadInput("extract-batch-size-negative", ("extract", "--inputs", "{tmp}", "--out", "{tmp}/feats", "--batch-size", "-4"), 2,
             rf"batch_size: -4 {RANGE} >= 1"),
    # the other commands
    BadInput("heatmap-alpha", ("heatmap", "--alpha", "2"), 2, rf"alpha: 2\.0 {RANGE} in \[0, 1\]"),
    BadInput("heatmap-vmin-vmax", ("heatmap", "vmin=1", "vmax=0.5"), 2, r"vmax: 0\.5 must be above vmin \(1\.0\)"),
    BadInput("mil-folds-1", ("eval", "mil", "cv.folds=1"), 2, rf"cv\.folds: 1 {RANGE} >= 2"),
    BadInput("seg-lr-0", ("eval", "seg", "--data", "{tmp}", "train.lr=0"), 2, rf"train\.lr: 0\.0 {RANGE} > 0"),
    BadInput("seg-fractions", ("eval", "seg", "--data", "{tmp}", "val_fraction=0.5", "test_fraction=0.6"), 2,
             r"test_fraction: val_fraction \+ test_fraction = 1\.1 leaves no training images"),
    # plain flags (not config keys) use the same range check through sgcl.config.arg_in_range
    BadInput("seg-predict-overlap-1", ("eval", "seg", "predict", "--checkpoint", "{tmp}", "--image", "{slide}", "--overlap", "1"), 2,
             rf"--overlap: 1 {RANGE} in \[0, 1\)"),
    BadInput("seg-predict-window-0", ("eval", "seg", "predict", "--checkpoint", "{tmp}", "--image", "{slide}", "--window", "0"), 2,
             rf"--window: 0 {RANGE} >= 1"),
    BadInput("seg-predict-batch-sci", ("eval", "seg", "predict", "--checkpoint", "{tmp}", "--image", "{slide}", "--batch-size", "1.5e0"), 2,
             r"--batch-size: .*expected an integer"),
    BadInput("demo-epochs-0", ("demo", "--out", "{tmp}/demo", "epochs=0"), 2, rf"epochs: 0 {RANGE} >= 1"),
    # item 8: the source of an unknown key
    BadInput("unknown-key-command-line", ("pretrain", "--config", "configs/pretrain/tiny_cpu.yaml", "optim.lrr=0.1"), 2,
             r"command line: unknown key optim\.lrr", absent=(r"tiny_cpu\.yaml: unknown",)),
    BadInput("unknown-key-file", ("pretrain", "--config", "{tmp}/typo.yaml", "optim.lr=0.1"), 2,
             r"typo\.yaml: unknown key optim\.lrr", absent=(r"command line: unknown",)),
]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_config_value_exits_2_naming_the_key(case, capfd, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # shipped config paths are relative to the repo
    (tmp_path / "bad_value.yaml").write_text("optim:\n  weight_decay: -0.1\n")
    (tmp_path / "typo.yaml").write_text("optim:\n  lrr: 0.1\n")
    pd.DataFrame({"path": [str(DEMO_SLIDE)], "patch.target_mpp": ["0"]}).to_csv(tmp_path / "slides.csv", index=False)
    run_case(case, capfd, tmp=tmp_path, slide=DEMO_SLIDE)
    # refused before any work: no output folder, no checkpoint, no export
    assert not any((tmp_path / name).exists() for name in ("tiles", "run", "feats", "demo"))


# -- scientific notation ---------------------------------------------------------------------------
def test_scientific_notation_in_yaml_overrides_lists_and_flags(tmp_path):
    from preprocessing.config import TileConfig
    from preprocessing.tile import parse_config
    from sgcl.train.config import PretrainConfig

    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  warmup_epochs: 5E-1\n  betas: [9e-1, 9.99e-1]\ntrain:\n  epochs: 1e2\n")
    cfg = load_config(PretrainConfig, path, ["optim.weight_decay=1e-5", "aug.global_scale=[2e-1, 1e0]", "optim.clip_grad=3e+0"])
    assert (cfg.optim.lr, cfg.optim.warmup_epochs, cfg.optim.betas) == (1e-3, 0.5, (0.9, 0.999))
    assert cfg.train.epochs == 100 and isinstance(cfg.train.epochs, int)
    assert (cfg.optim.weight_decay, cfg.aug.global_scale, cfg.optim.clip_grad) == (1e-5, (0.2, 1.0), 3.0)
    with pytest.raises(ConfigError, match=r"command line: train\.epochs: expected an integer, got '1\.5e0'"):
        load_config(PretrainConfig, None, ["train.epochs=1.5e0"])  # a whole number only
    with pytest.raises(ConfigError, match=rf"optim\.lr: -0\.001 {RANGE} > 0"):
        load_config(PretrainConfig, None, ["optim.lr=-1e-3"])  # and range-checked like any number

    from evaluation.cli import EvalConfig

    assert load_config(EvalConfig, None, ["linear.l2_grid=[1e-3,1e-2]"]).linear.l2_grid == [1e-3, 1e-2]
    assert load_config(TileConfig, None, ["patch.target_mpp=5e-1"]).patch.target_mpp == 0.5
    # argparse flags reach the config as JSON text: 1e-05 / 1e+20 have no dot or no signed exponent for YAML 1.1
    tile_cfg, _ = parse_config([str(DEMO_SLIDE), "--target-mpp", "1e-5", "--assume-mpp", "2.5e-1"])
    assert tile_cfg.patch.target_mpp == 1e-5 and tile_cfg.assume_mpp == 0.25


def test_scientific_notation_in_slide_list_columns(tmp_path):
    from preprocessing.config import TileConfig
    from preprocessing.slide_lists import job_config, read_slide_list

    csv = tmp_path / "slides.csv"
    pd.DataFrame({"path": [str(DEMO_SLIDE)], "patch.target_mpp": ["5e-1"], "assume_mpp": ["2.5E-1"]}).to_csv(csv, index=False)
    (job,) = read_slide_list(csv)
    cfg = job_config(TileConfig(), job)
    assert cfg.patch.target_mpp == 0.5 and cfg.assume_mpp == 0.25


# -- the mechanism ---------------------------------------------------------------------------------
@pytest.mark.parametrize("allowed, text, inside, outside", [
    (Range(gt=0), "> 0", [1e-9, 5], [0, -1]),
    (Range(ge=1), ">= 1", [1, 10**9], [0, 0.999]),
    (Range(ge=0, le=1), "in [0, 1]", [0, 1], [-1e-9, 1.0001]),
    (Range(ge=0, lt=1), "in [0, 1)", [0, 0.999], [1]),
    (Range(gt=0, le=0.5), "in (0, 0.5]", [0.5], [0, 0.6]),
    (Range(le=255), "<= 255", [-3, 255], [256]),
])
def test_range_text_and_membership(allowed, text, inside, outside):
    assert str(allowed) == text
    assert all(v in allowed for v in inside) and not any(v in allowed for v in outside)
    assert math.nan not in allowed and math.inf not in allowed


@dataclass
class _Sub:
    rate: float = bounded(0.5, ge=0, le=1)

    def validate(self) -> None:
        if self.rate == 0.25:
            raise ConfigError("rate: 0.25 is reserved", key="rate")


@dataclass
class _Cfg:
    ks: list[int] = bounded(default_factory=lambda: [1, 2], ge=1)
    cap: Optional[int] = bounded(None, ge=1)  # None = no cap: always allowed
    sub: _Sub = field(default_factory=_Sub)


def test_bounded_fields_items_none_and_direct_construction():
    Cfg, Sub = _Cfg, _Sub
    assert load_config(Cfg, None, ["cap=null", "ks=[3, 1e1]"]).ks == [3, 10]
    with pytest.raises(ConfigError, match=rf"command line: ks\[1\]: 0 {RANGE} >= 1") as info:
        load_config(Cfg, None, ["ks=[3, 0]"])
    assert info.value.key == "ks[1]"
    with pytest.raises(ConfigError, match=r"command line: sub\.rate: 0\.25 is reserved"):
        load_config(Cfg, None, ["sub.rate=0.25"])
    bad = Cfg(sub=Sub(rate=2.0))  # built in code: validate_config checks it, nested keys dotted
    with pytest.raises(ConfigError, match=rf"^sub\.rate: 2\.0 {RANGE} in \[0, 1\]$"):
        validate_config(bad)
    with pytest.raises(ConfigError, match=rf"sub\.rate: 2\.0 {RANGE}"):
        with_overrides(Cfg(), {"sub.rate": 2.0})

    from sgcl.methods.dense import DenseConfig

    with pytest.raises(ConfigError, match=rf"n_anchors: 1 {RANGE} >= 2"):
        DenseConfig(n_anchors=1)  # this section also checks itself when built in code


def test_error_source_is_the_file_or_the_command_line(tmp_path):
    from sgcl.train.config import PretrainConfig

    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: -0.5\naug:\n  global_scale: [0.9, 0.3]\n")
    with pytest.raises(ConfigError, match=rf"^{path}: optim\.lr: -0\.5 {RANGE} > 0$"):
        load_config(PretrainConfig, path)
    with pytest.raises(ConfigError, match=rf"^command line: optim\.lr: -2\.0 {RANGE}"):
        load_config(PretrainConfig, path, ["optim.lr=-2"])
    # the file's scale is wrong; setting one item on the command line (the whole list) moves the blame
    with pytest.raises(ConfigError, match=rf"^{path}: aug\.global_scale: \[0\.9, 0\.3\] must be"):
        load_config(PretrainConfig, path, ["optim.lr=0.1"])
    with pytest.raises(ConfigError, match=r"^command line: aug\.global_scale\[0\]: 0\.0 " + RANGE):
        load_config(PretrainConfig, path, ["optim.lr=0.1", "aug.global_scale=[0, 1]"])
    with pytest.raises(ConfigError, match=r"^command line: unknown key optim\.lrr"):
        load_config(PretrainConfig, None, ["optim.lrr=1"])


def test_every_default_and_shipped_config_passes_validation():
    import importlib

    from sgcl.config_reference import CONFIGS, rows
    from test_shipped_configs import CONFIGS as SHIPPED, _config_class

    for _, target in CONFIGS:
        module, name = target.split(":")
        cls = getattr(importlib.import_module(module), name)
        validate_config(cls())
        assert any(allowed for _, _, _, allowed, _ in rows(cls)), f"{target} declares no range"
    for path in SHIPPED:
        validate_config(load_config(_config_class(path), path))
    from preprocessing.config import TileConfig

    reference = {key: allowed for key, _, _, allowed, _ in rows(TileConfig)}
    assert reference["patch.stride"] == ">= 1" and reference["tissue.min_tissue_fraction"] == "in [0, 1]"


# -- kNN: k above the bank size ----------------------------------------------------------------------
def test_knn_k_above_bank_is_clipped_with_one_warning_in_results(tmp_path, capfd):
    from evaluation.features import FeatureSet
    from sgcl.cli import main

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(90) % 3
    feats = torch.randn(90, 8, generator=g) + 3 * torch.nn.functional.one_hot(labels, 8).float()
    splits = ["train"] * 63 + ["test"] * 27
    FeatureSet(feats, labels, ["a", "b", "c"], splits).save(tmp_path / "f.pt")
    capfd.readouterr()
    code = main(["eval", "knn", "--features", str(tmp_path / "f.pt"), "--out", str(tmp_path / "knn"), "knn.ks=[5,100,200]",
                 "knn.backend=torch", "report.bootstrap=0", "report.plots=false", "progress=false"])
    err = capfd.readouterr().err
    assert code == 0
    assert err.count("warning: knn.ks [100, 200] exceed the bank of 63 train+val items: clipped to k=63") == 1
    results = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert results["warnings"] == [w for w in results["warnings"] if "clipped to k=63" in w] and len(results["warnings"]) == 1
    assert results["knn"]["100"] == results["knn"]["200"]  # both use the whole bank
