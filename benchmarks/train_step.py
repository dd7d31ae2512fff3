"""Pretraining step time per method, and loader throughput against the model's consumption rate.

    python benchmarks/train_step.py                       # CPU: ResNet-18, batch 32, 112 px (indicative)
    python benchmarks/train_step.py --device cuda --precision bf16 --backbone resnet50 --size 224 --batch 128
    python benchmarks/train_step.py --crop rrc            # any registered crop policy for the loader part
    python benchmarks/train_step.py --rho                 # throughput against the small-window size (rho_sweep.py)

Part 1 times one optimiser step (forward, backward, SGD step, bank/queue/momentum update) on
synthetic batches for MoCo v2, SimCLR, full SGCL and SGCL without each term — same backbone,
batch and global image size, each method with the views it needs (SGCL: 1 global + 4 quadrant
crops; MoCo v2/SimCLR: 2 global) — and prints each as a ratio to MoCo v2 measured in the same run
(target: full SGCL <= 1.3x). SGCL's per-epoch k-means is timed separately.

Part 2 tiles the demo slide (JPEG patches, the tiler's default codec) and measures patches/s of one
loader worker (HDF5 read + JPEG decode + views + photometric jitter) for the SGCL and MoCo
transforms, and for the GPU-augmentation mode (``aug.gpu``: the worker only crops). The number of
workers the model needs is its images/s divided by the per-worker rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sgcl.config import load_config  # noqa: E402
from sgcl.methods.base import DatasetMeta  # noqa: E402
from sgcl.methods.config import MethodConfig, build_method  # noqa: E402
from sgcl.models.backbone import create_backbone  # noqa: E402
from sgcl.train.config import AugConfig  # noqa: E402
from sgcl.transforms.gpu import GPUPhotometric  # noqa: E402

VARIANTS = {
    "moco_v2": ("moco_v2", {}),
    "simclr": ("simclr", {}),
    "sgcl": ("sgcl", {"candidates": "exact"}),
    "sgcl-indexed": ("sgcl", {"candidates": "indexed"}),
    "sgcl-no-self": ("sgcl", {"self_term": False}),
    "sgcl-no-intra": ("sgcl", {"intra_term": False}),
    "sgcl-no-inter": ("sgcl", {"inter_term": False}),
    "sgcl-no-inner": ("sgcl", {"inner_term": False}),
    "sgcl-queue": ("sgcl", {"bank": "queue"}),
}


def synthetic_meta(n: int, slides: int = 16) -> DatasetMeta:
    """``n`` patches on ``slides`` square-ish grids (full tissue), for the spatial index."""
    per = n // slides
    side = int(per ** 0.5) + 1
    slide_of = torch.arange(n) // per
    slide_of = slide_of.clamp(max=slides - 1)
    local = torch.arange(n) - slide_of * per
    grid_of = torch.stack([local % side, local // side], 1)
    return DatasetMeta(num_patches=n, num_slides=slides, slide_of=slide_of.long(), grid_of=grid_of.long())


def method_config(name: str, sgcl_overrides: dict, args) -> MethodConfig:
    overrides = [f"name={name}", f"sgcl.num_negatives={min(args.bank_rows, 65536)}", f"sgcl.kmeans_clusters={args.kmeans_clusters}",
                 f"sgcl.nei_k={min(args.bank_rows // 4, 4096)}", f"moco.queue_size={args.queue}"]
    overrides += [f"sgcl.{k}={v}" for k, v in sgcl_overrides.items()]
    return load_config(MethodConfig, None, overrides)


class StepRunner:
    """One method with its optimiser and a synthetic batch; ``run(k)`` times ``k`` training steps."""

    def __init__(self, variant: str, args, device: torch.device):
        name, sgcl_over = VARIANTS[variant]
        torch.manual_seed(0)
        self.variant, self.args, self.device = variant, args, device
        cfg = method_config(name, sgcl_over, args)
        method = build_method(cfg, create_backbone(args.backbone)).to(device)
        if args.channels_last:
            method.to(memory_format=torch.channels_last)
        method.on_train_start(synthetic_meta(args.bank_rows))
        t0 = time.perf_counter()
        method.on_epoch_start(0)
        self.kmeans_s = time.perf_counter() - t0
        method.train()
        self.method = method
        self.opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        b, s, ls = args.batch, args.size, args.local_size
        mf = torch.channels_last if args.channels_last else torch.contiguous_format

        def images(n: int, size: int) -> torch.Tensor:
            return torch.randn(n, 3, size, size, device=device).contiguous(memory_format=mf)

        self.gpu_aug = GPUPhotometric() if args.gpu_aug else None
        if self.gpu_aug is not None:  # uint8 crops from the loader; jitter + normalise timed in the step
            self.raw = {"views": [torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, device=device) for _ in range(method.num_views)]}
            if method.needs_local:
                self.raw["local"] = torch.randint(0, 256, (4 * b, 3, ls, ls), dtype=torch.uint8, device=device)
        self.batch = {"views": [images(b, s) for _ in range(method.num_views)],
                      "index": torch.randperm(args.bank_rows)[:b].to(device),
                      "slide": torch.zeros(b, dtype=torch.long, device=device),
                      "grid": torch.zeros(b, 2, dtype=torch.long, device=device)}
        if method.needs_local:
            self.batch["local"] = images(4 * b, ls)
        self.amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
        self.views = f"{method.num_views}x{s}" + (f" + 4x{ls}" if method.needs_local else "")
        self.times: list[float] = []
        self.step = 0

    def run(self, k: int, record: bool = True) -> None:
        m, dev = self.method, self.device
        for _ in range(k):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            if self.gpu_aug is not None:
                mf = torch.channels_last if self.args.channels_last else torch.contiguous_format
                self.batch["views"] = [self.gpu_aug(v).contiguous(memory_format=mf) for v in self.raw["views"]]
                if "local" in self.raw:
                    self.batch["local"] = self.gpu_aug(self.raw["local"]).contiguous(memory_format=mf)
            with torch.autocast(dev.type, dtype=self.amp, enabled=self.amp is not None):
                out = m(self.batch, 1, self.step)
            self.scaler.scale(out["loss"]).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
            m.on_after_step(out)
            self.batch["index"] = torch.randperm(self.args.bank_rows)[: self.args.batch].to(dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            self.step += 1
            if record:
                self.times.append(time.perf_counter() - t)


def tile_demo(folder: Path, patch_size: int) -> Path:
    from preprocessing.config import TileConfig
    from preprocessing.slide_tiler import tile_slide

    cfg = TileConfig()
    cfg.patch.target_mpp, cfg.patch.patch_size = 0.5, patch_size
    cfg.output.codec = "jpeg"
    out = folder / "demo.h5"
    tile_slide(REPO / "data" / "demo" / "CMU-1-Small-Region.svs", out, cfg)
    return out


def loader_rate(h5: Path, aug: AugConfig, num_views: int, needs_local: bool, seconds: float) -> float:
    """Patches/s of one loader worker process (read + decode + views + jitter + to-tensor + collate),
    measured through a DataLoader with one worker, as in training (torch uses 1 thread there)."""
    batches = max(4, int(seconds * 4))
    return dataloader_rate(h5, aug, num_views, needs_local, 1, 16, batches)


def dataloader_rate(h5: Path, aug: AugConfig, num_views: int, needs_local: bool, workers: int, batch: int, batches: int) -> float:
    """Patches/s of a real DataLoader with ``workers`` worker processes (collate included)."""
    from torch.utils.data import DataLoader, RandomSampler

    from sgcl.data.dataset import PatchDataset, collate
    from sgcl.train.trainer import build_sample_transform

    ds = PatchDataset(h5, build_sample_transform(aug, num_views, needs_local))
    sampler = RandomSampler(ds, replacement=True, num_samples=batch * (batches + workers))
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate)
    it = iter(loader)
    for _ in range(max(1, workers)):  # let every worker start
        next(it)
    t0, n = time.perf_counter(), 0
    for b in it:
        n += b["index"].numel()
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--backbone", default=None, help="timm name (default resnet18 on CPU, resnet50 on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="default 32 on CPU, 128 on CUDA")
    p.add_argument("--size", type=int, default=None, help="global view side (default 112 on CPU, 224 on CUDA)")
    p.add_argument("--local-size", type=int, default=None, help="quadrant crop side (default size·96/224)")
    p.add_argument("--bank-rows", type=int, default=65536, help="patches N in the dataset (SGCL memory banks)")
    p.add_argument("--queue", type=int, default=16384, help="MoCo / SGCL-queue length")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 8 CPU, 30 CUDA)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--rounds", type=int, default=4, help="interleaved passes over the variants (alternating order)")
    p.add_argument("--kmeans-clusters", type=int, default=None, help="SGCL k-means clusters (default 1000 CUDA, 100 CPU)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--crop", default="rrc", help="crop policy of the loader benchmark (sgcl.transforms.crops)")
    p.add_argument("--loader-seconds", type=float, default=None)
    p.add_argument("--workers", type=int, default=None, help="also time a real DataLoader with this many workers")
    p.add_argument("--no-loader", action="store_true")
    p.add_argument("--loader-only", action="store_true", help="skip the step timing (loader part only)")
    p.add_argument("--target-img-s", type=float, default=None,
                   help="consumption rate to size the loader against (default: the measured model rate)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on for CUDA, off for the CPU (CPU BatchNorm is slow in channels_last)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--gpu-aug", action=argparse.BooleanOptionalAction, default=None,
                   help="time the on-device colour jitter inside the step (aug.gpu); default on for CUDA")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--rho", nargs="?", const="", default=None,
                   help="sweep mode (benchmarks/rho_sweep.py): step and loader throughput against the small-window size "
                        "rho in native mode, e.g. --rho or --rho 1,1/2,1/4,1/8")
    p.add_argument("--rho-method", default="moco_v2", help="method of the --rho sweep (moco_v2 | simclr | sgcl)")
    p.add_argument("--dense", action="store_true", help="--rho sweep with the dense pixel-level term")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA device visible: run this mode on a GPU machine", file=sys.stderr)
        return 2
    args.backbone = args.backbone or ("resnet50" if cuda else "resnet18")
    args.batch = args.batch or (128 if cuda else 32)
    args.size = args.size or (224 if cuda else 112)
    args.local_size = args.local_size or max(16, round(args.size * 96 / 224))
    args.steps = args.steps or (40 if cuda else 8)
    args.kmeans_clusters = args.kmeans_clusters or (1000 if cuda else 100)
    if args.channels_last is None:
        args.channels_last = cuda
    if args.gpu_aug is None:
        args.gpu_aug = cuda
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.loader_seconds = args.loader_seconds or (5.0 if cuda else 3.0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device = torch.device(args.device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else f'{os.cpu_count()} CPU cores, {torch.get_num_threads()} threads'}), "
          f"{args.backbone}, batch {args.batch}, global {args.size}px, local {args.local_size}px, {args.precision}, N={args.bank_rows}")
    if args.rho is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from rho_sweep import run as rho_sweep

        with tempfile.TemporaryDirectory() as tmp:
            sweep = rho_sweep(args, device, loader_rate, tile_demo, Path(tmp))
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rho_sweep": sweep}, indent=2, default=str))
        return 0
    results: dict = {"args": vars(args), "steps": [], "loader": {}}
    variants = [] if args.loader_only else args.variants.split(",")
    runners = {v: StepRunner(v, args, device) for v in variants}
    for r in runners.values():
        r.run(args.warmup, record=False)
    per_round = max(1, args.steps // args.rounds)
    for rnd in range(args.rounds):  # interleave so a shared machine's load drifts hit every variant alike
        for variant in (variants if rnd % 2 == 0 else variants[::-1]):
            runners[variant].run(per_round)
    runs = {v: {"variant": v, "views": r.views, "kmeans_s": r.kmeans_s, "times": r.times} for v, r in runners.items()}
    base = statistics.median(runs["moco_v2"]["times"]) if "moco_v2" in runs else None
    for variant in variants:
        r = runs[variant]
        r["step_s"] = statistics.median(r.pop("times"))
        r["img_per_s"] = args.batch / r["step_s"]
        r["ratio_to_moco_v2"] = r["step_s"] / base if base else float("nan")
        results["steps"].append(r)
        print(f"  {variant:<15} {r['views']:<18} step {r['step_s'] * 1000:8.1f} ms  {r['img_per_s']:8.1f} img/s  "
              f"x{r['ratio_to_moco_v2']:.2f} vs MoCo v2" + (f"  (k-means/epoch {r['kmeans_s']:.2f} s)" if r["kmeans_s"] > 0.01 else ""))
    if not args.no_loader:
        aug = AugConfig(crop=args.crop, global_size=args.size, local_size=args.local_size)
        gpu_aug = AugConfig(crop=args.crop, global_size=args.size, local_size=args.local_size, gpu=True)
        with tempfile.TemporaryDirectory() as tmp:
            h5 = tile_demo(Path(tmp), max(args.size, 224))
            rates = {
                "sgcl (1 global + 4 local, CPU jitter)": loader_rate(h5, aug, 1, True, args.loader_seconds),
                "moco_v2 (2 global, CPU jitter)": loader_rate(h5, aug, 2, False, args.loader_seconds),
                "sgcl, aug.gpu (crops only)": loader_rate(h5, gpu_aug, 1, True, args.loader_seconds),
            }
            if args.workers:
                rates[f"sgcl DataLoader, {args.workers} workers (total)"] = dataloader_rate(h5, aug, 1, True, args.workers, 32, 20)
        by_variant = {r["variant"]: r for r in results["steps"]}
        print(f"loader ({args.crop} crops, JPEG patches of the demo slide):")
        for label, rate in rates.items():
            key = "sgcl" if label.startswith("sgcl") else "moco_v2"
            consume = args.target_img_s or (by_variant[key]["img_per_s"] if key in by_variant else None)
            need = consume / rate if consume and "total" not in label else float("nan")
            results["loader"][label] = {"patches_per_s": rate, "workers_needed": need, "consumption_img_s": consume}
            extra = f"  -> {need:.2f} workers to feed {consume:.0f} img/s" if need == need else ""
            print(f"  {label:<42} {rate:8.1f} patches/s{extra}")
        if by_variant:
            cores = os.cpu_count() or 1
            for key in ("sgcl", "moco_v2"):
                if key in by_variant:
                    labels = (["sgcl (1 global + 4 local, CPU jitter)", "sgcl, aug.gpu (crops only)"] if key == "sgcl"
                              else ["moco_v2 (2 global, CPU jitter)"])
                    for label in labels:
                        need = by_variant[key]["img_per_s"] / results["loader"][label]["patches_per_s"]
                        verdict = "keeps up" if need <= max(1, cores - 2) else "is the bottleneck"  # 2 cores for the trainer
                        results["loader"][label][f"verdict_{key}"] = verdict
                        print(f"  {key} at {by_variant[key]['img_per_s']:.0f} img/s with {label}: needs {need:.1f} workers, "
                              f"{cores} cores here: the loader {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
