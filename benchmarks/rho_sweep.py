"""The ``--rho`` mode of ``benchmarks/train_step.py``: pretraining throughput against the small-window
size ρ in native mode (methods.md §2.2: a window of ρ·L fed as is has ρ² of the pixels).

    python benchmarks/train_step.py --rho                      # ρ = 1, 1/2, 1/4, 1/8 (CPU: ResNet-18, L = 112)
    python benchmarks/train_step.py --rho 1,0.25 --dense       # with the dense pixel-level term
    python benchmarks/train_step.py --rho --device cuda --precision bf16 --size 224 --batch 128

For every ρ it times (a) one optimiser step of the method (default MoCo v2) on batches of two
native ρ·L views with their geometries, and (b) one loader worker building those views from the
demo slide's JPEG patches (``aug.crop=small_window``, proximity placement, native). Throughput =
images/s of the step; the ratio is against ρ = 1 (the full L crop) measured in the same run.
Target: ≥ 2× at ρ = 1/4.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import numpy as np
import torch

from sgcl.config import load_config
from sgcl.methods.base import DatasetMeta
from sgcl.methods.config import MethodConfig, build_method
from sgcl.models.backbone import create_backbone
from sgcl.train.config import AugConfig
from sgcl.transforms.scale_aware import SmallWindowConfig

DEFAULT_RHOS = (1.0, 0.5, 0.25, 0.125)


def parse_rhos(text: str | None) -> list[float]:
    """``None``/"" -> the default sweep; else comma-separated values such as ``1,0.5,1/4``."""
    if not text:
        return list(DEFAULT_RHOS)
    out = []
    for part in text.split(","):
        num, _, den = part.strip().partition("/")
        out.append(float(num) / float(den) if den else float(num))
    if 1.0 not in out:
        out.insert(0, 1.0)  # the baseline of the ratios
    return out


def _geoms(b: int, side: int, rng: np.random.Generator, full: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Geometry rows of proximity pairs of native ``side``-px windows in a ``full``-px patch."""
    from sgcl.transforms.scale_aware import SmallWindowCrop

    crop = SmallWindowCrop(rho=min(1.0, side / full), size=full, placement="proximity")
    rows = ([], [])
    for _ in range(b):
        for k, box in enumerate(crop.sample_pair(full, full, rng)):
            rows[k].append([box.x0, box.y0, box.w, box.h, box.w, box.h, float(rng.random() < 0.5), float(rng.integers(4))])
    return torch.tensor(rows[0], dtype=torch.float32), torch.tensor(rows[1], dtype=torch.float32)


class NativeStepRunner:
    """One method on two native ``side``-px views per patch; ``step()`` = one timed optimiser step."""

    def __init__(self, method_name: str, side: int, args, device: torch.device, dense: bool):  # noqa: ANN001
        torch.manual_seed(0)
        overrides = [f"name={method_name}", f"moco.queue_size={args.queue}", f"sgcl.num_negatives={min(args.bank_rows, 65536)}",
                     f"sgcl.nei_k={min(args.bank_rows // 4, 4096)}", "sgcl.inner_term=false"]
        if dense:
            overrides += ["dense.enabled=true", "dense.n_anchors=32"]
        cfg = load_config(MethodConfig, None, overrides)
        self.method = build_method(cfg, create_backbone(args.backbone)).to(device)
        self.n, self.b, self.device = args.bank_rows, args.batch, device
        n = self.n
        self.method.on_train_start(DatasetMeta(num_patches=n, num_slides=1, slide_of=torch.zeros(n, dtype=torch.long),
                                               grid_of=torch.stack([torch.arange(n) % 256, torch.arange(n) // 256], 1)))
        self.method.on_epoch_start(0)
        self.method.train()
        self.opt = torch.optim.SGD([p for p in self.method.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        mf = torch.channels_last if args.channels_last else torch.contiguous_format
        g1, g2 = _geoms(self.b, side, np.random.default_rng(0), args.size)
        self.batch = {"views": [torch.randn(self.b, 3, side, side, device=device).contiguous(memory_format=mf) for _ in range(2)],
                      "geoms": [g1.to(device), g2.to(device)], "index": torch.randperm(n)[: self.b].to(device),
                      "slide": torch.zeros(self.b, dtype=torch.long, device=device),
                      "grid": torch.zeros(self.b, 2, dtype=torch.long, device=device)}
        self.amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
        self.count = 0

    def step(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            out = self.method(self.batch, 1, self.count)
        out["loss"].backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.method.on_after_step(out)
        self.batch["index"] = torch.randperm(self.n)[: self.b].to(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.count += 1
        return time.perf_counter() - t


def run(args, device: torch.device, loader_rate, tile_demo, tmp_dir) -> dict:  # noqa: ANN001 - helpers from train_step
    """The sweep; ``loader_rate`` / ``tile_demo`` are train_step's loader helpers (one implementation)."""
    rhos = parse_rhos(args.rho)
    method = args.rho_method
    print(f"rho sweep (native windows of rho*{args.size}px, two proximity views, {method}"
          f"{' + dense term' if args.dense else ''}), ratios to rho=1 in this run:")
    h5 = None if args.no_loader else tile_demo(tmp_dir, max(args.size, 224))
    sides = [max(8, int(round(rho * args.size))) for rho in rhos]
    runners = [NativeStepRunner(method, side, args, device, args.dense) for side in sides]
    for r in runners:  # warm-up
        for _ in range(args.warmup):
            r.step()
    # interleaved rounds: drift of a shared machine hits every rho alike
    times: list[list[float]] = [[] for _ in rhos]
    for _ in range(args.steps):
        for i, r in enumerate(runners):
            times[i].append(r.step())
    rows = []
    for rho, side, t in zip(rhos, sides, times):
        med = statistics.median(t)
        rows.append({"rho": rho, "side": side, "step_s": med, "img_per_s": args.batch / med})
    if h5 is not None:
        def aug_for(rho: float) -> AugConfig:
            return AugConfig(crop="small_window", global_size=args.size,
                             small_window=replace(SmallWindowConfig(), rho=rho, resolution="native", placement="proximity"))

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker (torch sets 1 thread there)
        try:
            loader_rate(h5, aug_for(1.0), 2, False, 0.5)  # warm-up: file open, codecs, caches
            rates: list[list[float]] = [[] for _ in rhos]
            for _ in range(3):
                for i, rho in enumerate(rhos):
                    rates[i].append(loader_rate(h5, aug_for(rho), 2, False, args.loader_seconds / 3))
        finally:
            torch.set_num_threads(threads)
        for row, rr in zip(rows, rates):
            row["loader_patches_per_s"] = statistics.median(rr)
    base = next(r for r in rows if r["rho"] == 1.0)
    for r in rows:
        r["step_ratio"] = r["img_per_s"] / base["img_per_s"]
        if "loader_patches_per_s" in r:
            r["loader_ratio"] = r["loader_patches_per_s"] / base["loader_patches_per_s"]
        loader = (f"  loader {r['loader_patches_per_s']:7.1f} patches/s/worker  x{r['loader_ratio']:.2f}"
                  if "loader_ratio" in r else "")
        print(f"  rho={r['rho']:<6g} {r['side']:>4}px  step {r['step_s'] * 1000:8.1f} ms  {r['img_per_s']:8.1f} img/s  "
              f"x{r['step_ratio']:.2f}{loader}")
    quarter = next((r for r in rows if abs(r["rho"] - 0.25) < 1e-9), None)
    if quarter is not None:
        verdict = "meets" if quarter["step_ratio"] >= 2.0 else "misses"
        print(f"  rho=1/4 step throughput x{quarter['step_ratio']:.2f} of the full crop: {verdict} the >= 2x target")
    return {"method": method, "dense": args.dense, "rows": rows}
