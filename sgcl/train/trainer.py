"""The pretraining loop: one process, one GPU, or many through ``torchrun`` (DDP).

``Trainer(cfg).fit()`` builds the data (``PatchDataset`` + ``ResumableDistributedSampler``), the
backbone (timm) and method (``build_method``), the optimiser and schedule; it auto-resumes from
``<out>/checkpoints/last.pt`` (or ``train.resume``), trains with autocast/GradScaler/grad
accumulation, checkpoints atomically, logs metrics, and exports the backbone at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import deque
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from sgcl.config import to_dict
from sgcl.data.dataset import PatchDataset, SampleTransform, collate
from sgcl.data.sampler import ResumableDistributedSampler
from sgcl.methods.base import PretrainMethod
from sgcl.models.backbone import create_backbone, export_backbone
from sgcl.train.checkpoint import LAST_NAME, capture_rng, find_resume, load_checkpoint, restore_rng, save_checkpoint
from sgcl.train.config import PretrainConfig
from sgcl.train.health import hard_negative_note, representation_spread, verdict
from sgcl.train.logging import MetricLogger
from sgcl.train.optim import build_optimizer, param_groups
from sgcl.train.schedule import scaled_lr, set_lr, warmup_cosine
from sgcl.transforms.crops import RandomResizedCropPolicy, build_crop_policy
from sgcl.transforms.gpu import GPUPhotometric
from sgcl.transforms.multicrop import QuadrantMultiCrop
from sgcl.transforms.photometric import PhotometricAugment, PhotometricParams
from sgcl.transforms.views import ViewBuilder
from sgcl.utils.atomic import atomic_write_json
from sgcl.utils.threads import adapt_threads, resolve_workers, worker_init_fn


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stopped and the last good checkpoint was kept."""


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1), else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank)


def resolve_device(spec: str, info: DistInfo) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu")
        return torch.device("cuda", info.local_rank)
    return torch.device(spec)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def photometric_params(aug) -> PhotometricParams:
    return PhotometricParams(brightness=aug.brightness, contrast=aug.contrast, saturation=aug.saturation, hue=aug.hue,
                             p_jitter=aug.p_jitter, hed_sigma=aug.hed_sigma, p_hed=aug.p_hed, p_grey=aug.p_grey,
                             p_blur=aug.p_blur)


def build_sample_transform(aug, num_views: int, needs_local: bool, dense=None) -> SampleTransform:
    """The per-sample transform of the config's ``aug`` section for a method's view needs. ``dense``:
    the ``method.dense`` section (``DenseConfig``); with ``sampler: igu`` the global views carry their
    entropy maps and get IGU-Aug's adaptive jitter (``sgcl.methods.dense.build_info_guide``)."""
    from sgcl.methods.dense import build_info_guide

    guide = build_info_guide(dense, aug.gpu)
    regional = guide if guide is not None and guide.jitter is not None else None
    photometric = None if aug.gpu else PhotometricAugment(photometric_params(aug), regional)
    window = dataclasses.asdict(aug.small_window)
    policy = build_crop_policy(aug.crop, aug.global_size, tuple(aug.global_scale), **(window if aug.crop == "small_window" else {}))
    builder = ViewBuilder(policy, photometric, hflip_p=aug.hflip, rotate90=aug.rotate90)
    multicrop = None
    if needs_local:
        if aug.local_crop == "small_window":
            local_policy = build_crop_policy("small_window", aug.local_size, **window)
        else:
            local_policy = RandomResizedCropPolicy(aug.local_size, scale=tuple(aug.local_scale))
        multicrop = QuadrantMultiCrop(ViewBuilder(local_policy, photometric, hflip_p=aug.hflip, rotate90=aug.rotate90))
    return SampleTransform(builder, num_views=num_views, multicrop=multicrop, normalize=not aug.gpu, guide=guide)


def default_method_builder(cfg: PretrainConfig, backbone: nn.Module) -> PretrainMethod:
    from sgcl.methods.config import build_method

    return build_method(cfg.method, backbone)


class Trainer:
    def __init__(self, cfg: PretrainConfig, method_builder: Callable[[PretrainConfig, nn.Module], PretrainMethod] | None = None):
        self.cfg = cfg
        self.method_builder = method_builder or default_method_builder
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.dist = init_distributed(cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = resolve_device(cfg.train.device, self.dist)
        self.global_step = 0
        self.history: deque[dict] = deque(maxlen=100_000)  # recent steps' rows (rank 0), returned by fit()
        self.health: dict[str, dict] = {}  # last representation spread per row set, with its verdict

    # -- construction ---------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        if self.dist.is_main:
            print(f"[sgcl pretrain] {msg}", file=sys.stderr, flush=True)

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.train.grad_accum < 1 or cfg.data.batch_size < 1:
            raise ValueError("data.batch_size and train.grad_accum must be >= 1")
        seed_everything(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        sources = ([cfg.data.h5_dir] if cfg.data.h5_dir else []) + list(cfg.data.files)
        if not sources:
            raise ValueError("no data: set data.h5_dir=<folder of .h5 patch files> (or --h5-dir) or data.files=[...]")

        backbone = create_backbone(cfg.model.backbone)
        if cfg.model.init_weights:
            from sgcl.models.encoders import init_backbone

            init = init_backbone(backbone, cfg.model.backbone, cfg.model.init_weights)
            self._log(f"{cfg.model.backbone} initialised from {init['weights']} (sha256 {init['sha256'][:12]})")
        method = self.method_builder(cfg, backbone)
        transform = build_sample_transform(cfg.aug, method.num_views, method.needs_local, cfg.method.dense)
        self.dataset = PatchDataset(sources, transform, cache_files=cfg.data.cache_files, seed=cfg.train.seed,
                                    skip_bad=cfg.data.skip_bad_files, slide_dirs=cfg.data.slide_dirs)
        for path, why in self.dataset.bad_files:
            self._log(f"skipped {path}: {why}")
        if self.dataset.empty_slides:
            from sgcl.utils.empty_slides import ignored_empty_note

            self._log(ignored_empty_note(self.dataset.empty_slides))
        self.sampler = ResumableDistributedSampler(len(self.dataset), self.dist.world_size, self.dist.rank,
                                                   shuffle=True, seed=cfg.train.seed, drop_last=True)
        self.micro_per_epoch = (self.sampler.per_rank // cfg.data.batch_size) // cfg.train.grad_accum * cfg.train.grad_accum
        if self.micro_per_epoch == 0:
            raise ValueError(f"{len(self.dataset)} patches over {self.dist.world_size} process(es) do not fill one step of "
                             f"batch_size {cfg.data.batch_size} × grad_accum {cfg.train.grad_accum}; lower data.batch_size")
        self.steps_per_epoch = self.micro_per_epoch // cfg.train.grad_accum
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

        if cfg.model.sync_bn and self.dist.world_size > 1:
            if self.device.type == "cpu":  # PyTorch's SyncBatchNorm runs on GPUs only
                self._log("model.sync_bn ignored on the CPU (SyncBatchNorm needs GPUs); BatchNorm stays per process")
            else:
                method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        method.to(self.device)
        self.channels_last = cfg.model.channels_last and self.device.type == "cuda"  # CPU BatchNorm is slow in it
        if self.channels_last:
            method.to(memory_format=torch.channels_last)
        method.on_train_start(self.dataset.meta(cfg.method.sgcl.radius))
        if cfg.model.compile:
            method.backbone.compile()
        self.method = method
        self.model: nn.Module = method
        if self.dist.world_size > 1:
            ddp_kwargs: dict[str, Any] = {"broadcast_buffers": False}
            if self.device.type == "cuda":
                ddp_kwargs["device_ids"] = [self.device.index]
            self.model = nn.parallel.DistributedDataParallel(method, **ddp_kwargs)

        self.global_batch = cfg.data.batch_size * self.dist.world_size * cfg.train.grad_accum
        self.peak_lr = scaled_lr(cfg.optim.lr, self.global_batch, cfg.optim.scale_lr)
        self.warmup_steps = int(round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        groups = param_groups(method, cfg.optim.weight_decay, cfg.optim.exclude_bias_norm)
        self.optimizer = build_optimizer(cfg.optim.name, groups, self.peak_lr, cfg.optim.weight_decay,
                                         cfg.optim.momentum, tuple(cfg.optim.betas), cfg.optim.lars_eta)
        prec = cfg.train.precision
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(prec == "fp16"))
        self.gpu_aug = GPUPhotometric(photometric_params(cfg.aug)) if cfg.aug.gpu else None
        self.aug_gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + self.dist.rank)
        self.loader_gen = torch.Generator().manual_seed(cfg.train.seed)
        self.logger = MetricLogger(self.out_dir, enabled=self.dist.is_main)
        self.start_epoch = 0
        self._maybe_resume()

    # -- checkpoints ----------------------------------------------------------------------------
    def _gather_rng(self) -> list[dict]:
        state = capture_rng()
        state["aug_gen"] = self.aug_gen.get_state()
        if self.dist.world_size == 1:
            return [state]
        states: list = [None] * self.dist.world_size
        dist.all_gather_object(states, state)
        return states

    def state_dict(self) -> dict:
        return {
            "format": "sgcl-checkpoint", "version": 1,
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method_extra": self.method.extra_state(),
            "sampler": self.sampler.state_dict(),
            "global_step": self.global_step,
            "world_size": self.dist.world_size,
            "config": to_dict(self.cfg),
        }

    def save(self) -> Path | None:
        rng = self._gather_rng()  # collective: every rank takes part
        if not self.dist.is_main:
            return None
        state = self.state_dict()
        state["rng"] = rng
        return save_checkpoint(self.ckpt_dir / LAST_NAME, state)

    def _maybe_resume(self) -> None:
        path = find_resume(self.out_dir, self.cfg.train.resume, self.cfg.train.auto_resume)
        if path is None:
            return
        state = load_checkpoint(path)
        if state.get("format") != "sgcl-checkpoint":
            from sgcl.train.checkpoint import CheckpointError

            raise CheckpointError(f"{path} is not an sgcl training checkpoint (no 'format' key); pass a file written by `sgcl pretrain`")
        missing, unexpected = self.method.load_state_dict(state["model"], strict=False)
        if missing:
            from sgcl.train.checkpoint import CheckpointError

            raise CheckpointError(f"{path}: the model does not match the config (missing {missing[:4]}...); "
                                  "resume with the config the checkpoint was written with (it is stored inside it)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_extra_state(state.get("method_extra", {}))
        self.sampler.load_state_dict(state["sampler"])
        self.global_step = int(state["global_step"])
        self.logger.truncate_after(self.global_step)  # steps after the checkpoint are redone: no duplicate rows
        rng = state.get("rng") or []
        if rng:
            mine = rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0]
            restore_rng(mine)
            if "aug_gen" in mine:
                self.aug_gen.set_state(mine["aug_gen"])
        micro_done = self.sampler.position // self.cfg.data.batch_size
        self.start_epoch = self.sampler.epoch
        if micro_done >= self.micro_per_epoch:
            self.start_epoch += 1
        self._log(f"resumed from {path} at step {self.global_step} (epoch {self.start_epoch}, "
                  f"{micro_done % self.micro_per_epoch if micro_done < self.micro_per_epoch else 0} batches into it)")

    # -- the loop -------------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        workers = self.cfg.data.workers  # unset: cores - 1 (the entry point notes an explicit value above that)
        workers = resolve_workers(None) if workers is None else workers
        kwargs: dict[str, Any] = {}
        if workers > 0:
            kwargs["prefetch_factor"] = self.cfg.data.prefetch_factor
            kwargs["worker_init_fn"] = worker_init_fn
        return DataLoader(self.dataset, batch_size=self.cfg.data.batch_size, sampler=self.sampler, num_workers=workers,
                          collate_fn=collate, pin_memory=self.cfg.data.pin_memory and self.device.type == "cuda",
                          drop_last=True, generator=self.loader_gen, persistent_workers=False, **kwargs)

    def _to_device(self, batch: dict) -> dict:
        nb = self.device.type == "cuda"
        mf = torch.channels_last if self.channels_last else torch.contiguous_format

        def images(x: torch.Tensor) -> torch.Tensor:
            x = x.to(self.device, non_blocking=nb)
            if self.gpu_aug is not None:
                x = self.gpu_aug(x, self.aug_gen)
            return x.contiguous(memory_format=mf)

        out = {}
        for k, v in batch.items():
            if k == "views":
                out[k] = [images(x) for x in v]
            elif k == "local":
                out[k] = images(v)
            elif isinstance(v, list):
                out[k] = [x.to(self.device, non_blocking=nb) for x in v]
            else:
                out[k] = v.to(self.device, non_blocking=nb)
        return out

    def _check_finite(self, loss: torch.Tensor, terms: dict) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=self.device)
        if self.dist.world_size > 1:
            dist.all_reduce(bad)
        if bad.item() > 0:
            last = self.ckpt_dir / LAST_NAME
            keep = f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint was written yet"
            vals = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items() if torch.is_tensor(v) and v.numel() == 1)
            raise NonFiniteLossError(
                f"the loss is not finite at step {self.global_step} (epoch {self.sampler.epoch}; {vals}); training stopped and "
                f"{keep}. Lower optim.lr, raise optim.warmup_epochs, or use train.precision=bf16/fp32 instead of fp16.")

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Average logged scalars over the ranks (every rank calls this at the same steps)."""
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.dist.world_size for k, v in zip(keys, t.tolist())}

    def fit(self, stop_after_steps: int | None = None) -> list[dict]:
        """Train until ``train.epochs``/``train.max_steps`` (or ``stop_after_steps`` more steps, for tests
        of interruption); returns the logged rows of this process."""
        if not hasattr(self, "method"):
            self.setup()
        cfg = self.cfg
        accum = cfg.train.grad_accum
        stop_at = self.total_steps if stop_after_steps is None else min(self.total_steps, self.global_step + stop_after_steps)
        autocast = (lambda: torch.autocast(self.device.type, dtype=self.amp_dtype)) if self.amp_dtype else contextlib.nullcontext
        self.model.train()
        try:
            from tqdm import tqdm

            bar = tqdm(total=stop_at, initial=self.global_step, desc="pretrain", unit="step", dynamic_ncols=True,
                       disable=not (cfg.train.progress and self.dist.is_main))
        except ImportError:  # pragma: no cover
            bar = None
        finished = self.global_step >= stop_at
        t_fit = time.perf_counter()
        epoch = self.start_epoch
        while not finished and epoch < cfg.train.epochs:
            self.sampler.set_epoch(epoch)
            self.dataset.set_epoch(epoch)
            self.method.on_epoch_start(epoch)
            micro = self.sampler.position // cfg.data.batch_size
            t0, seen = time.perf_counter(), 0
            terms_acc: dict[str, float] = {}
            for batch in self._loader():
                if micro >= self.micro_per_epoch:
                    break
                batch = self._to_device(batch)
                last_micro = (micro + 1) % accum == 0
                sync = contextlib.nullcontext() if (last_micro or self.dist.world_size == 1) else self.model.no_sync()
                with sync:
                    with autocast():
                        # fractional epoch: ramps (SGCL's w(e)) move within an epoch, equal to the integer epoch at its start
                        out = self.model(batch, epoch + micro / self.micro_per_epoch, self.global_step)
                    loss = out["loss"]
                    self._check_finite(loss, out)
                    self.scaler.scale(loss / accum).backward()
                for k, v in out.items():
                    if torch.is_tensor(v) and v.numel() == 1:
                        terms_acc[k] = terms_acc.get(k, 0.0) + float(v.detach()) / accum
                micro += 1
                seen += cfg.data.batch_size * self.dist.world_size
                self.sampler.advance(cfg.data.batch_size)
                if not last_micro:
                    continue
                lr = warmup_cosine(self.global_step, self.total_steps, self.peak_lr, self.warmup_steps, cfg.optim.min_lr)
                set_lr(self.optimizer, lr)
                if cfg.optim.clip_grad:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.method.parameters(), cfg.optim.clip_grad)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.method.on_after_step(out)
                self.global_step += 1
                adapt_threads()  # an automatic thread count follows the machine's load (sgcl.utils.threads)
                elapsed = time.perf_counter() - t0
                row = {"step": self.global_step, "epoch": epoch, **terms_acc, "lr": lr,
                       "img_per_s": seen / elapsed if elapsed > 0 else 0.0, "elapsed_s": time.perf_counter() - t_fit}
                terms_acc = {}
                health_now = cfg.train.health_every > 0 and (self.global_step % cfg.train.health_every == 0 or self.global_step == stop_at)
                log_now = self.global_step % cfg.train.log_every == 0 or self.global_step == 1 or health_now
                if log_now and self.dist.world_size > 1:
                    row.update(self._mean_over_ranks({k: v for k, v in row.items() if k not in ("step", "epoch", "lr", "img_per_s", "elapsed_s")}))
                if health_now and self.dist.is_main:  # rank 0's own rows (no collective)
                    row.update(self._check_health(row))
                if self.dist.is_main:
                    self.history.append(row)
                    if log_now:
                        self.logger.log(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}")
                end_of_epoch = micro >= self.micro_per_epoch
                if self.global_step % cfg.train.ckpt_every == 0 or end_of_epoch or self.global_step >= stop_at:
                    self.save()
                if self.global_step >= stop_at:
                    finished = True
                    break
                if end_of_epoch:
                    break
            if not finished:
                epoch += 1
        if bar is not None:
            bar.close()
        self.logger.close()
        if self.dist.is_main and self.health:
            atomic_write_json(self.out_dir / "health.json", {"step": self.global_step, "rows": self.health})
        if self.global_step >= self.total_steps and cfg.train.export:
            self.export()
        return list(self.history)

    def _check_health(self, row: dict) -> dict[str, float]:
        """Spread of the method's bank/queue rows and recent backbone features (logged as
        ``health/<rows>_<metric>``); warns when a verdict appears or changes."""
        out: dict[str, float] = {}
        for name, rows in self.method.representation_rows().items():
            if rows.shape[0] < 2:
                continue
            spread = representation_spread(rows)
            for key in ("mean_cos", "dim_std", "eff_rank"):
                out[f"health/{name}_{key}"] = spread[key]
            message = verdict(spread)
            if name in ("bank", "queue") and message is None and "pos_sim" in row and "neg_sim" in row:
                message = hard_negative_note(float(row["pos_sim"]), float(row["neg_sim"]), spread["mean_cos"])
            previous = self.health.get(name, {}).get("verdict")
            if message and message != previous:
                self._log(f"step {self.global_step}: {name} rows: {message}")
            self.health[name] = {**spread, "verdict": message, "step": self.global_step}
        return out

    # -- export ---------------------------------------------------------------------------------
    def export(self) -> Path | None:
        if not self.dist.is_main:
            return None
        config = to_dict(self.cfg)
        atomic_write_json(self.out_dir / "config.json", config)
        backbone = self.method.backbone
        backbone = getattr(backbone, "_orig_mod", backbone)
        path = export_backbone(backbone, self.cfg.model.backbone, self.out_dir / "export", config)
        self._log(f"exported the backbone to {path}")
        return path

    def close(self, ok: bool = True) -> None:
        """Release file handles and leave the process group (after a barrier when ``ok``: a failed
        rank must not wait for the others)."""
        if hasattr(self, "dataset"):
            self.dataset.close()
        if self.dist.world_size > 1 and dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()
