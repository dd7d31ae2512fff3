"""Cost of the method itself (heads, losses, banks, mining, updates) per training step, without the backbone.

The backbone is replaced by an identity on precomputed F-dim features. What is timed is therefore
only what SGCL adds on top of the encoder, at bank sizes N. The baseline, measured in the same run, is
MoCo v2's method cost. For scale, the run also times one resnet18 forward+backward at 224 px with
the same batch. Ratios are printed against both.

    python benchmarks/sgcl_overhead.py --sizes 100000 1000000 --batch 32 --reps 3

Writes JSON to ``--out`` (default bench_out/sgcl_overhead.json). Only indicative on a shared CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgcl.clustering import effective_clusters  # noqa: E402
from sgcl.methods import MethodConfig, build_method  # noqa: E402
from sgcl.methods.base import DatasetMeta  # noqa: E402
from sgcl.models.backbone import create_backbone  # noqa: E402


class FeatureBackbone(nn.Module):
    """Identity 'backbone' over (B, F, 1, 1) inputs: isolates the method's own cost."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) * self.scale


def synthetic_meta(n: int, side: int = 64) -> DatasetMeta:
    per = side * side
    i = torch.arange(n)
    slide = i // per
    cell = i % per
    grid = torch.stack([cell % side, cell // side], 1)
    return DatasetMeta(n, int(slide.max()) + 1, slide, grid)


class Runner:
    """One built method and its timings; ``step()`` runs forward, backward and the bank/queue update."""

    def __init__(self, cfg: MethodConfig, meta: DatasetMeta, batch: int, feat: int):
        torch.manual_seed(0)
        self.meta, self.batch, self.feat = meta, batch, feat
        self.method = build_method(cfg, FeatureBackbone(feat))
        self.method.on_train_start(meta)
        if hasattr(self.method, "clusters"):
            agreeing_clusters(self.method)
        self.times: list[float] = []
        self.steps = 0

    def step(self, record: bool) -> None:
        b, m = self.batch, self.method
        idx = torch.randint(0, self.meta.num_patches, (b,))
        batch = {
            "views": [torch.randn(b, self.feat, 1, 1) for _ in range(m.num_views)],
            "local": torch.randn(4 * b, self.feat, 1, 1),
            "index": idx, "slide": self.meta.slide_of[idx], "grid": self.meta.grid_of[idx],
        }
        t0 = time.perf_counter()
        out = m(batch, 20, self.steps)
        out["loss"].backward()
        m.on_after_step(out)
        self.steps += 1
        if record:
            self.times.append(time.perf_counter() - t0)

    def median(self) -> float:
        return sorted(self.times)[len(self.times) // 2]


def agreeing_clusters(method) -> None:
    """k-means labels whose R runs agree (groups of N/C rows, the largest k-means can give), as
    after a refit on a trained bank; the random initial labels would leave ~1-row groups and
    flatter ``candidates=indexed``. The exhaustive path's cost does not depend on the labels."""
    r, n = method.clusters.shape
    c = effective_clusters(n, method.cfg.sgcl.kmeans_clusters)
    labels = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    method.clusters.copy_(labels.expand(r, n))


def time_backbone(batch: int, reps: int) -> float:
    torch.manual_seed(0)
    model = create_backbone("resnet18")
    x = torch.randn(batch, 3, 224, 224)
    times = []
    for r in range(reps + 1):
        t0 = time.perf_counter()
        model(x).sum().backward()
        if r:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def variants(n: int) -> list[tuple[str, MethodConfig]]:
    """Term ablations at small N; at N >= 1M the scalable settings only (fp16 banks keep RAM in check)."""
    exact = {"candidates": "exact"}
    small = [
        ("moco_v2", "moco_v2", {}),
        ("simclr", "simclr", {}),
        ("sgcl (memory, full)", "sgcl", exact),
        ("sgcl (memory, full, indexed)", "sgcl", {"candidates": "indexed"}),
        ("sgcl - self", "sgcl", {**exact, "self_term": False}),
        ("sgcl - intra", "sgcl", {**exact, "intra_term": False}),
        ("sgcl - inter", "sgcl", {**exact, "inter_term": False}),
        ("sgcl - inner", "sgcl", {**exact, "inner_term": False}),
        ("sgcl (queue, full)", "sgcl", {"bank": "queue"}),
    ]
    fp16_indexed = {"bank_dtype": "float16", "candidates": "indexed"}
    large = [
        ("moco_v2", "moco_v2", {}),
        ("sgcl (memory, fp16)", "sgcl", {**exact, "bank_dtype": "float16"}),
        ("sgcl (memory, fp16, pool 100k)", "sgcl", {**exact, "bank_dtype": "float16", "mining_pool": 100_000}),
        ("sgcl (memory, fp16, indexed)", "sgcl", fp16_indexed),
        ("sgcl (memory, fp16, indexed, mining pool 8k)", "sgcl", {**fp16_indexed, "mining_pool": 8192}),
        ("sgcl (memory, fp16, indexed, all NPID negatives)", "sgcl", {**fp16_indexed, "npid_sample": 65536}),
        ("sgcl (memory, fp16, indexed, mining pool 65k)", "sgcl", {**fp16_indexed, "mining_pool": 65536}),
        ("sgcl (memory, fp16, indexed) - inter", "sgcl", {**fp16_indexed, "inter_term": False}),
        ("sgcl (queue, full)", "sgcl", {"bank": "queue"}),
    ]
    out = []
    for label, name, kw in (small if n < 1_000_000 else large):
        cfg = MethodConfig(name=name)
        for k, v in kw.items():
            setattr(cfg.sgcl, k, v)
        out.append((label, cfg))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--feat", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_out/sgcl_overhead.json")
    ap.add_argument("--only", nargs="*", default=None, help="variant labels to run (default all; moco_v2 always runs)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    backbone_s = time_backbone(args.batch, max(1, args.reps - 1))
    print(f"resnet18 fwd+bwd, {args.batch}×224²: {backbone_s * 1000:.0f} ms (one view)")
    rows = []
    for n in args.sizes:
        meta = synthetic_meta(n)
        chosen = [(lb, c) for lb, c in variants(n) if args.only is None or lb == "moco_v2" or lb in args.only]
        runners = [(label, Runner(cfg, meta, args.batch, args.feat)) for label, cfg in chosen]
        for rnd in range(args.reps + 1):  # interleaved rounds: machine load hits every variant alike
            for _, r in runners:
                r.step(record=rnd > 0)
        base = runners[0][1].median()
        for label, r in runners:
            t = r.median()
            rows.append({"N": n, "variant": label, "ms": t * 1000, "vs_moco_method": t / base, "vs_r18_step": t / backbone_s})
            print(f"N={n:>9,}  {label:<32} {t * 1000:8.1f} ms  ×{t / base:6.2f} MoCo-method  {100 * t / backbone_s:6.1f}% of one r18 fwd+bwd")
        del runners
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, {args.threads} threads, shared",
        "batch": args.batch, "feat_dim": args.feat, "resnet18_fwd_bwd_ms": backbone_s * 1000, "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
