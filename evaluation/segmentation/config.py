"""Typed config of ``sgcl eval seg`` (YAML: ``configs/eval/seg.yaml``; dotted overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from sgcl.config import ConfigError, bounded


@dataclass
class SegModelConfig:
    encoder: str = "resnet18"  # export folder of `sgcl pretrain`, a checkpoint file, or a timm name (random init)
    frozen: bool = False  # True: train the decoder only (encoder and its BatchNorm statistics fixed)
    num_classes: int = bounded(0, ge=0)  # 0: 1 + the largest class index found in the masks
    decoder_channels: Optional[list[int]] = bounded(None, ge=1)  # one per skip level; default min(256, encoder channels)
    out_indices: Optional[list[int]] = bounded(None, ge=0)  # encoder stages to use; default all


@dataclass
class SegTrainConfig:
    epochs: int = bounded(100, ge=1)
    steps_per_epoch: int = bounded(50, ge=1)
    batch_size: int = bounded(16, ge=1)
    patch_size: int = bounded(128, ge=1)  # training crop side, px
    fg_fraction: float = bounded(0.5, ge=0, le=1)  # share of patches centred on a foreground pixel
    lr: float = bounded(1e-3, gt=0)  # decoder learning rate (AdamW)
    encoder_lr: float = bounded(1e-4, ge=0)  # encoder learning rate when fine-tuned (methods.md §2.2: 1e-4)
    weight_decay: float = bounded(1e-4, ge=0)
    warmup_steps: int = bounded(0, ge=0)
    label_fraction: float = bounded(1.0, gt=0, le=1)  # share of training images used (1 %, 10 %, 100 % ...), seeded and nested
    seed: int = bounded(0, ge=0)
    num_workers: int = bounded(0, ge=0)
    dice_weight: float = bounded(1.0, ge=0)
    ce_weight: float = bounded(0.5, ge=0)
    exclude_background: bool = True  # in the Dice loss and in the mean Dice/IoU reported
    augment: bool = True
    threads: int = bounded(0, ge=0)  # torch CPU threads; 0 = automatic (allowed cores - workers; docs/threads.md)

    def validate(self) -> None:
        """dice_weight and ce_weight are not both 0."""
        if self.dice_weight == 0 and self.ce_weight == 0:
            raise ConfigError("dice_weight: dice_weight and ce_weight are both 0 (no loss); make one positive",
                              key="dice_weight")


@dataclass
class SegInferConfig:
    window: int = bounded(0, ge=0)  # sliding window side; 0 = train.patch_size
    overlap: float = bounded(0.5, ge=0, lt=1)  # fraction of the window shared by neighbouring windows
    weighting: Literal["gaussian", "uniform"] = "gaussian"
    batch_size: int = bounded(8, ge=1)
    save_png: int = bounded(8, ge=0)  # test images saved as prediction/overlay PNGs


@dataclass
class SegConfig:
    data: str = ""  # folder (images/ + masks/, or train/ val/ test/) or CSV image,mask[,split]
    out: str = "runs/seg"
    device: str = "auto"  # auto | cpu | cuda | cuda:1
    mpp: Optional[float] = bounded(None, gt=0)  # µm/px of the training images: used to predict slide regions at the same scale
    val_fraction: float = bounded(0.15, ge=0, lt=1)  # used only when the data has no val split
    test_fraction: float = bounded(0.15, ge=0, lt=1)  # used only when the data has no test split
    model: SegModelConfig = field(default_factory=SegModelConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    infer: SegInferConfig = field(default_factory=SegInferConfig)

    def validate(self) -> None:
        """val_fraction + test_fraction < 1."""
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(f"test_fraction: val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} "
                              "leaves no training images; keep the sum below 1", key="test_fraction")
