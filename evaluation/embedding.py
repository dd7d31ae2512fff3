"""The one inference path: encoder loading, its input transform, and batched feature computation.

``sgcl extract`` (per-slide MIL features) and ``evaluation.features`` (labelled sets) both call
:func:`embed_dataset`, so both get the same transform, autocast, DataLoader workers and progress.

A dataset here is anything with ``__len__`` and ``__getitem__(i) -> (H, W, 3) uint8 RGB``. The
transform (resize to the model's input size, scale, normalise with the model's mean/std from
``timm.data.resolve_data_config``) runs in the DataLoader workers inside the collate function, so
reading and preprocessing overlap with the forward pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class ImageDataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> np.ndarray: ...


@dataclass
class Encoder:
    """A frozen backbone with its identity (``info``: model_name, num_features, sha256) and input config."""
    model: nn.Module
    info: dict
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    @property
    def name(self) -> str:
        return str(self.info["model_name"])

    @property
    def num_features(self) -> int:
        return int(self.info["num_features"])

    def transform(self) -> "BatchTransform":
        return BatchTransform(self.input_size, self.mean, self.std, self.interpolation)

    def fingerprint(self) -> dict:
        """What determines the features besides the pixels (used for resume checks); a registry
        encoder adds its registry name and pooling rule."""
        fp = {"encoder": self.name, "weights_sha256": self.info.get("sha256") or "", "input_size": self.input_size,
              "mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}
        if self.info.get("encoder"):
            fp.update(registry=str(self.info["encoder"]), pooling=str(self.info.get("pooling") or ""))
        return fp


def load_encoder(spec: str, model_name: str | None = None, input_size: int | None = None,
                 weights: str | None = None) -> Encoder:
    """An encoder from an ``sgcl pretrain`` export folder/file, a registry encoder name with its
    ``weights`` (:mod:`sgcl.models.encoders`), or a timm model name (random init, no download).

    The transform is the registry entry's (input size, mean/std, interpolation), else the timm
    model's pretrained config (``resolve_data_config``); ``input_size`` overrides the side length.
    """
    import timm.data

    from sgcl.models.backbone import load_backbone
    from sgcl.models.encoders import ENCODERS

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a timm name without weights: a reproducible random-init baseline
        model, info = load_backbone(spec, model_name=model_name, weights=weights)
    if not info.get("sha256"):
        info = {**info, "sha256": state_sha256(model), "weights": "random-init(seed=0)"}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    entry = ENCODERS.get(str(info.get("encoder") or ""))
    if entry is not None:
        return Encoder(model, info, int(input_size or entry.input_size), tuple(entry.mean), tuple(entry.std),
                       entry.interpolation)
    cfg = timm.data.resolve_data_config({}, model=model)
    size = int(input_size or cfg["input_size"][-1])
    interp = str(cfg.get("interpolation", "bicubic"))
    if interp not in ("bilinear", "bicubic", "nearest"):
        interp = "bilinear"
    return Encoder(model, info, size, tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]), interp)


def state_sha256(model: nn.Module) -> str:
    """sha256 of the parameters and buffers (names, shapes, bytes) of ``model``."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class BatchTransform:
    """uint8 RGB images (a list of (H, W, 3) arrays) -> normalised float32 (B, 3, S, S) tensor."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic"):
        self.size = int(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.interpolation = interpolation

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        kwargs = {"antialias": True, "align_corners": False} if self.interpolation != "nearest" else {}
        return F.interpolate(x, size=(self.size, self.size), mode=self.interpolation, **kwargs)

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        shapes = {im.shape for im in images}
        for shape in shapes:
            if len(shape) != 3 or shape[2] != 3:
                raise ValueError(f"expected (H, W, 3) RGB images, got shape {shape}")
        if len(shapes) == 1:
            x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
            x = self._resize(x)
        else:
            x = torch.cat([self._resize(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float().div_(255.0))
                           for im in images])
        if self.interpolation == "bicubic":
            x = x.clamp_(0.0, 1.0)
        return (x - self.mean) / self.std


class _Collate:
    def __init__(self, transform: BatchTransform):
        self.transform = transform

    def __call__(self, items: list[np.ndarray]) -> torch.Tensor:
        return self.transform(items)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """None = run in fp32. ``auto`` is bf16 on a GPU and fp32 on a CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass
class EmbedStats:
    n: int = 0
    seconds_total: float = 0.0
    seconds_waiting_for_data: float = 0.0
    seconds_compute: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        rate = self.n / self.seconds_total if self.seconds_total > 0 else 0.0
        return {"n": self.n, "seconds_total": round(self.seconds_total, 4),
                "seconds_waiting_for_data": round(self.seconds_waiting_for_data, 4),
                "seconds_compute": round(self.seconds_compute, 4), "items_per_second": round(rate, 3)}


def make_loader(dataset: ImageDataset, transform: BatchTransform, batch_size: int, num_workers: int | None,
                pin_memory: bool, timeout: float = 0) -> torch.utils.data.DataLoader:
    """In-order batches; ``timeout`` (seconds, with workers only) bounds each wait for a batch.
    ``num_workers=None``: cores - 1 (:func:`sgcl.utils.threads.resolve_workers`); each worker runs 1 thread."""
    from sgcl.utils.threads import resolve_workers, worker_init_fn

    num_workers = resolve_workers(None) if num_workers is None else num_workers
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_Collate(transform),
        pin_memory=pin_memory, persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
        timeout=timeout if num_workers > 0 else 0, worker_init_fn=worker_init_fn if num_workers > 0 else None,
    )


@torch.inference_mode()
def embed_batches(model: nn.Module, batches, device: torch.device, amp: torch.dtype | None,
                  num_items: int, progress: str | None = None, stats: EmbedStats | None = None) -> np.ndarray:
    """Run ``model`` over an iterable of input batches; returns (N, D) float32 features."""
    from tqdm import tqdm

    from sgcl.utils.threads import adapt_threads

    stats = stats if stats is not None else EmbedStats()
    model.to(device).eval()
    out: list[np.ndarray] = []
    bar = tqdm(total=num_items, desc=progress, unit="patch", disable=progress is None, leave=False)
    t0 = time.perf_counter()
    it = iter(batches)
    while True:
        tw = time.perf_counter()
        try:
            x = next(it)
        except StopIteration:
            break
        tc = time.perf_counter()
        stats.seconds_waiting_for_data += tc - tw
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            y = model(x)
        if y.ndim != 2:
            raise ValueError(f"the encoder returned shape {tuple(y.shape)}; expected pooled (B, D) features "
                             "(create it with num_classes=0)")
        out.append(y.float().cpu().numpy())
        stats.seconds_compute += time.perf_counter() - tc
        adapt_threads()  # an automatic thread count follows the machine's load
        stats.n += x.shape[0]
        bar.update(x.shape[0])
    bar.close()
    stats.seconds_total += time.perf_counter() - t0
    if not out:
        return np.zeros((0, int(getattr(model, "num_features", 0))), np.float32)
    feats = np.concatenate(out)
    if not np.isfinite(feats).all():
        raise FloatingPointError("the encoder produced NaN/inf features; try precision=fp32")
    return feats


def embed_dataset(encoder: Encoder, dataset: ImageDataset, batch_size: int = 64, num_workers: int | None = None,
                  device: str | torch.device = "auto", precision: Precision = "auto", progress: str | None = None,
                  stats: EmbedStats | None = None) -> np.ndarray:
    """Features (N, D) float32 of every image of ``dataset``, in order."""
    dev = resolve_device(device) if isinstance(device, str) else device
    loader = make_loader(dataset, encoder.transform(), batch_size, num_workers, pin_memory=dev.type == "cuda")
    return embed_batches(encoder.model, loader, dev, autocast_dtype(precision, dev), len(dataset), progress, stats)
