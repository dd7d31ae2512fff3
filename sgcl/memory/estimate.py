"""Memory of a method's banks, queues and indices, from the config alone (see docs/memory.md).

``python -m sgcl.memory.estimate --feat-dim 512`` prints the table of docs/memory.md.
Persistent state is what lives on the device for the whole run (and in every checkpoint);
the per-step transient is the largest temporary of the SGCL losses (top-k of the mining).
"""

from __future__ import annotations

import argparse
import math

from sgcl.clustering import effective_clusters
from sgcl.methods.config import INDEXED_MINING_POOL, MethodConfig, uses_indexed

SPATIAL_INDEX_BYTES_PER_PATCH = 40  # slide (8) + grid (16) + sorted key (8) + order (8)
SEMI_HARD_TOP_QUANTILE = 0.7        # the deepest of 4096 Beta(5,15) rank positions sits near 0.6–0.7


def _bytes(dtype: str) -> int:
    return 2 if dtype in ("float16", "bfloat16") else 4


def estimate_memory(cfg: MethodConfig, num_patches: int, feat_dim: int, batch_size: int = 128) -> dict[str, int]:
    """Bytes per component for ``num_patches`` patches and a backbone of ``feat_dim`` features."""
    s, n, d = cfg.sgcl, int(num_patches), cfg.proj_dim
    out: dict[str, int] = {}
    if cfg.name == "moco_v2":
        out["queue"] = cfg.moco.queue_size * (d * 4 + 8)
        return out
    if cfg.name == "simclr":
        return out
    b = _bytes(s.bank_dtype)
    spatial = s.intra_term or s.inter_term
    by_backbone = spatial and s.mining != "uniform" and s.backbone_bank
    if spatial:
        out["spatial_index"] = n * SPATIAL_INDEX_BYTES_PER_PATCH
    if s.bank == "queue":
        k = cfg.moco.queue_size
        out["queue"] = k * (d * b + 8 + 8 + 16)
        if by_backbone:
            out["queue_backbone_features"] = k * feat_dim * b
        if s.inter_term:
            out["centroids"] = s.kmeans_runs * effective_clusters(k, s.kmeans_clusters) * d * 4
        out["step_transient"] = batch_size * (k + batch_size) * (4 + 1 + 8)  # sims, masks, exclusion
        return out
    out["bank"] = n * d * b
    if by_backbone:
        out["backbone_bank"] = n * feat_dim * b
    if s.inner_term:
        out["quadrant_banks"] = 4 * n * d * b
    if s.inter_term:
        out["cluster_labels"] = s.kmeans_runs * n * 4  # int32
        if uses_indexed(s, n):
            out["cluster_index"] = n * 16  # group id + member order, int64 (sgcl.memory.cluster_index)
    if spatial:
        pool = s.mining_pool if s.mining_pool > 0 else (INDEXED_MINING_POOL if uses_indexed(s, n) else 0)
        ranked = min(pool, n) if pool > 0 else n
        if s.mining == "semi_hard":
            top = math.ceil(s.mining_frac * ranked * SEMI_HARD_TOP_QUANTILE)
        else:
            top = min(s.nei_k, ranked)
        chunk = ranked if s.sim_chunk <= 0 else min(s.sim_chunk, ranked)
        out["step_transient"] = batch_size * (top + chunk) * (4 + 8) * 2  # values + indices, merge copy
    return out


def persistent_bytes(parts: dict[str, int]) -> int:
    return sum(v for k, v in parts.items() if k != "step_transient")


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def table(feat_dim: int = 512, sizes=(1_000_000, 10_000_000, 50_000_000), batch_size: int = 128) -> str:
    """Markdown table of persistent / transient memory per mode at each N."""
    modes = []
    for label, kw in [
        ("SGCL memory bank, fp32", dict(bank="memory", bank_dtype="float32")),
        ("SGCL memory bank, fp16", dict(bank="memory", bank_dtype="float16")),
        ("SGCL memory bank, fp16, mining_pool=1M", dict(bank="memory", bank_dtype="float16", mining_pool=1_000_000)),
        ("SGCL queue (K=65,536), fp16", dict(bank="queue", bank_dtype="float16")),
    ]:
        cfg = MethodConfig(name="sgcl")
        for k, v in kw.items():
            setattr(cfg.sgcl, k, v)
        modes.append((label, cfg))
    moco = MethodConfig(name="moco_v2")
    lines = ["| mode | " + " | ".join(f"N = {n // 1_000_000}M" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for label, cfg in modes + [("MoCo v2 queue", moco)]:
        cells = []
        for n in sizes:
            parts = estimate_memory(cfg, n, feat_dim, batch_size)
            cells.append(f"{human(persistent_bytes(parts))} (+{human(parts.get('step_transient', 0))}/step)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--feat-dim", type=int, default=512, help="backbone features (resnet18 512, resnet50 2048, ViT-S 384)")
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args(argv)
    print(table(args.feat_dim, batch_size=args.batch_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
