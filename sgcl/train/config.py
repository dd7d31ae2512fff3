"""``PretrainConfig``: the typed config of ``sgcl pretrain`` (``configs/pretrain/*.yaml``).

Batch sizes: ``data.batch_size`` is per process; the global batch is
``batch_size × world_size × train.grad_accum`` and the learning rate is ``optim.lr × global/256``
when ``optim.scale_lr`` (the linear scaling rule; ``optim.lr`` is the rate at a global batch of 256).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from sgcl.methods.config import MethodConfig
from sgcl.transforms.scale_aware import SmallWindowConfig


@dataclass
class DataConfig:
    h5_dir: Optional[str] = None        # folder of per-slide .h5 patch files (`sgcl tile` output, patches/)
    files: list[str] = field(default_factory=list)  # and/or files, globs, .txt lists of files
    slide_dirs: list[str] = field(default_factory=list)  # folders with the slides of coords-only (--no-pixels) files; else source_path attr
    batch_size: int = 64                # per process
    workers: int = 8                    # DataLoader worker processes per process
    cache_files: int = 64               # open HDF5 handles (or slides, for coords-only files) kept per worker (LRU)
    prefetch_factor: int = 2
    pin_memory: bool = True
    skip_bad_files: bool = False        # drop invalid files with a warning instead of stopping


@dataclass
class AugConfig:
    crop: str = "rrc"                   # crop policy name (sgcl.transforms.crops.CROP_POLICIES): rrc | full | small_window
    local_crop: Literal["rrc", "small_window"] = "rrc"  # policy of the SGCL quadrant (multi-crop local) views
    small_window: SmallWindowConfig = field(default_factory=SmallWindowConfig)  # scale-aware crops (methods.md §2)
    global_size: int = 224
    global_scale: tuple[float, float] = (0.2, 1.0)
    local_size: int = 96                # SGCL quadrant crops
    local_scale: tuple[float, float] = (0.2, 0.56)
    hflip: float = 0.5
    rotate90: bool = True               # random 90° rotations (pathology has no canonical orientation)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1                    # SGCL reference uses 0.4 (strong for H&E)
    p_jitter: float = 0.8
    hed_sigma: float = 0.0              # HED stain jitter strength (0 = off; 0.03-0.05 typical)
    p_hed: float = 0.5
    p_grey: float = 0.2
    p_blur: float = 0.5
    gpu: bool = False                   # photometric jitter on the device (loader only decodes + crops)


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
    lr: float = 0.03                    # at a global batch of 256 (see scale_lr)
    scale_lr: bool = True
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    lars_eta: float = 0.001
    exclude_bias_norm: bool = True      # no weight decay (and no LARS adaptation) on biases and norms
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    clip_grad: Optional[float] = None


@dataclass
class TrainConfig:
    epochs: int = 100
    max_steps: Optional[int] = None     # stop after this many optimiser steps (whole run)
    grad_accum: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    ckpt_every: int = 1000              # optimiser steps between checkpoints (and one at each epoch end)
    log_every: int = 10
    health_every: int = 50              # steps between representation-spread diagnostics (0 = off; sgcl/train/health.py)
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
