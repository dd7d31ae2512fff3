"""Typed config of ``sgcl eval seg`` (YAML: ``configs/eval/seg.yaml``; dotted overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class SegModelConfig:
    encoder: str = "resnet18"  # export folder of `sgcl pretrain`, a checkpoint file, or a timm name (random init)
    frozen: bool = False  # True: train the decoder only (encoder and its BatchNorm statistics fixed)
    num_classes: int = 0  # 0: 1 + the largest class index found in the masks
    decoder_channels: Optional[list[int]] = None  # one per skip level; default min(256, encoder channels)
    out_indices: Optional[list[int]] = None  # encoder stages to use; default all


@dataclass
class SegTrainConfig:
    epochs: int = 100
    steps_per_epoch: int = 50
    batch_size: int = 16
    patch_size: int = 128
    fg_fraction: float = 0.5  # share of patches centred on a foreground pixel
    lr: float = 1e-3  # decoder learning rate (AdamW)
    encoder_lr: float = 1e-4  # encoder learning rate when fine-tuned (methods.md §2.2: 1e-4)
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    label_fraction: float = 1.0  # share of training images used (1 %, 10 %, 100 % ...), seeded and nested
    seed: int = 0
    num_workers: int = 0
    dice_weight: float = 1.0
    ce_weight: float = 0.5
    exclude_background: bool = True  # in the Dice loss and in the mean Dice/IoU reported
    augment: bool = True
    threads: int = 0  # torch CPU threads; 0 = torch's default


@dataclass
class SegInferConfig:
    window: int = 0  # sliding window side; 0 = train.patch_size
    overlap: float = 0.5
    weighting: Literal["gaussian", "uniform"] = "gaussian"
    batch_size: int = 8
    save_png: int = 8  # test images saved as prediction/overlay PNGs


@dataclass
class SegConfig:
    data: str = ""  # folder (images/ + masks/, or train/ val/ test/) or CSV image,mask[,split]
    out: str = "runs/seg"
    device: str = "auto"  # auto | cpu | cuda | cuda:1
    mpp: Optional[float] = None  # µm/px of the training images: used to predict slide regions at the same scale
    val_fraction: float = 0.15  # used only when the data has no val split
    test_fraction: float = 0.15  # used only when the data has no test split
    model: SegModelConfig = field(default_factory=SegModelConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    infer: SegInferConfig = field(default_factory=SegInferConfig)
