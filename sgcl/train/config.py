"""``PretrainConfig``: the typed config of ``sgcl pretrain`` (``configs/pretrain/*.yaml``).

Batch sizes: ``data.batch_size`` is per process; the global batch is
``batch_size × world_size × train.grad_accum`` and the learning rate is ``optim.lr × global/256``
when ``optim.scale_lr`` (the linear scaling rule; ``optim.lr`` is the rate at a global batch of 256).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from sgcl.config import ConfigError, bounded
from sgcl.methods.config import MethodConfig
from sgcl.transforms.scale_aware import SmallWindowConfig


@dataclass
class DataConfig:
    h5_dir: Optional[str] = None        # folder of per-slide .h5 patch files (`sgcl tile` output, patches/)
    files: list[str] = field(default_factory=list)  # and/or files, globs, .txt lists of files
    slide_dirs: list[str] = field(default_factory=list)  # folders with the slides of coords-only (--no-pixels) files; else source_path attr
    batch_size: int = bounded(64, ge=1)  # per process
    workers: Optional[int] = bounded(None, ge=0)  # DataLoader worker processes per process; unset: min(8, allowed cores - 1) (docs/threads.md)
    cache_files: int = bounded(64, ge=1)  # open HDF5 handles (or slides, for coords-only files) kept per worker (LRU)
    prefetch_factor: int = bounded(2, ge=1)  # batches loaded in advance per worker
    pin_memory: bool = True
    skip_bad_files: bool = False        # drop invalid files with a warning instead of stopping


@dataclass
class AugConfig:
    crop: str = "rrc"                   # crop policy name (sgcl.transforms.crops.CROP_POLICIES): rrc | full | small_window
    local_crop: Literal["rrc", "small_window"] = "rrc"  # policy of the SGCL quadrant (multi-crop local) views
    small_window: SmallWindowConfig = field(default_factory=SmallWindowConfig)  # scale-aware crops (methods.md §2)
    global_size: int = bounded(224, ge=1)  # side of the global views, px
    global_scale: tuple[float, float] = bounded((0.2, 1.0), gt=0, le=1)  # RandomResizedCrop area range (min, max)
    local_size: int = bounded(96, ge=1)  # SGCL quadrant crops
    local_scale: tuple[float, float] = bounded((0.2, 0.56), gt=0, le=1)  # area range (min, max) of the local crops
    hflip: float = bounded(0.5, ge=0, le=1)  # probability of a horizontal flip
    rotate90: bool = True               # random 90° rotations (pathology has no canonical orientation)
    brightness: float = bounded(0.4, ge=0)
    contrast: float = bounded(0.4, ge=0)
    saturation: float = bounded(0.4, ge=0)
    hue: float = bounded(0.1, ge=0, le=0.5)  # SGCL reference uses 0.4 (strong for H&E)
    p_jitter: float = bounded(0.8, ge=0, le=1)
    hed_sigma: float = bounded(0.0, ge=0)  # HED stain jitter strength (0 = off; 0.03-0.05 typical)
    p_hed: float = bounded(0.5, ge=0, le=1)
    p_grey: float = bounded(0.2, ge=0, le=1)
    p_blur: float = bounded(0.5, ge=0, le=1)
    gpu: bool = False                   # photometric jitter on the device (loader only decodes + crops)

    def validate(self) -> None:
        """global_scale and local_scale are (min, max) with min <= max."""
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ConfigError(f"{name}: {[lo, hi]} must be (min, max) with min <= max", key=name)


@dataclass
class ModelConfig:
    backbone: str = "resnet50"          # any timm model name or registry encoder (uni, phikon, ...: docs/encoders.md)
    init_weights: Optional[str] = None  # start from these weights (registry: its published file/folder; timm: timm keys or an export)
    channels_last: bool = True         # on GPUs (ignored on the CPU, where it slows BatchNorm)
    compile: bool = False               # torch.compile the backbone
    sync_bn: bool = False               # SyncBatchNorm across ranks (DDP)


@dataclass
class OptimConfig:
    name: Literal["sgd", "lars", "adamw"] = "sgd"
    lr: float = bounded(0.03, gt=0)     # at a global batch of 256 (see scale_lr)
    scale_lr: bool = True
    weight_decay: float = bounded(1e-4, ge=0)
    momentum: float = bounded(0.9, ge=0, lt=1)  # sgd / lars
    betas: tuple[float, float] = bounded((0.9, 0.999), ge=0, lt=1)  # adamw
    lars_eta: float = bounded(0.001, gt=0)
    exclude_bias_norm: bool = True      # no weight decay (and no LARS adaptation) on biases and norms
    warmup_epochs: float = bounded(0.0, ge=0)
    min_lr: float = bounded(0.0, ge=0)
    clip_grad: Optional[float] = bounded(None, gt=0)  # max gradient norm (None = no clipping)


@dataclass
class TrainConfig:
    epochs: int = bounded(100, ge=1)
    max_steps: Optional[int] = bounded(None, ge=1)  # stop after this many optimiser steps (whole run)
    grad_accum: int = bounded(1, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = bounded(0, ge=0)
    ckpt_every: int = bounded(1000, ge=1)  # optimiser steps between checkpoints (and one at each epoch end)
    log_every: int = bounded(10, ge=1)  # optimiser steps between metric rows
    health_every: int = bounded(50, ge=0)  # steps between representation-spread diagnostics (0 = off; sgcl/train/health.py)
    out_dir: str = "outputs/pretrain"
    resume: Optional[str] = None        # a checkpoint path; None = auto-resume from out_dir/checkpoints/last.pt
    auto_resume: bool = True
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    deterministic: bool = False         # torch.use_deterministic_algorithms
    export: bool = True                 # write <out_dir>/export/backbone.safetensors at the end
    progress: bool = True               # tqdm bar


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
