"""Extraction throughput (`sgcl extract`'s inference path) against the model's pure forward pass.

Input: a patch file derived from the real demo slide (its tissue patches tiled by the tiling stage,
repeated to ``--patches``, stored as JPEG like `sgcl tile`'s default), generated in a temporary
folder at run time. Both measurements use the same backbone, batch size and threads in one run:

- baseline: the forward pass alone over batches already decoded, resized and normalised in memory;
- extraction: `evaluation.embedding.embed_dataset` reading + decoding + transforming the patches in
  DataLoader workers while the main process runs the model.

ratio = extraction patches/s / forward-only patches/s (target >= 0.9: reading hidden behind compute).

    python benchmarks/extract.py [--model resnet50] [--patches 128] [--batch-size 32] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import torch


def make_input(folder: Path, n: int) -> Path:
    from preprocessing.config import TileConfig
    from preprocessing.h5format import PatchFile, write_patch_file
    from preprocessing.slide_tiler import tile_slide

    cfg = TileConfig()
    cfg.output.codec, cfg.output.qc = "raw", False
    tiled = tile_slide(REPO / "data" / "demo" / "CMU-1-Small-Region.svs", folder / "tiled.h5", cfg)
    pf = PatchFile(folder / "tiled.h5")
    imgs = pf.read_many(range(len(pf)))
    reps = np.arange(n) % len(imgs)
    out = folder / "derived-demo.h5"
    write_patch_file(out, imgs[reps], pf.coords()[reps], pf.grid()[reps], codec="jpeg", quality=90)
    print(f"input: {n} JPEG patches derived from the demo slide ({tiled.n_patches} distinct tissue patches, repeated)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--patches", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads for the forward pass (default: torch's)")
    p.add_argument("--repeats", type=int, default=3, help="alternating repetitions; the fastest of each is reported")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from evaluation.embedding import EmbedStats, embed_batches, embed_dataset, load_encoder, resolve_device
    from evaluation.sources import StoredPatches

    device = resolve_device("auto")
    with tempfile.TemporaryDirectory() as tmp:
        path = make_input(Path(tmp), a.patches)
        enc = load_encoder(a.model)
        data = StoredPatches(path)
        tf = enc.transform()
        # baseline batches: decoded + transformed up front, kept in memory
        batches = [tf([data[i] for i in range(s, min(s + a.batch_size, len(data)))]) for s in range(0, len(data), a.batch_size)]
        embed_batches(enc.model, batches[:1], device, None, a.batch_size)  # warm-up
        runs = []
        for _ in range(a.repeats):  # alternate to even out load from other processes on a shared machine
            t = time.perf_counter()
            base = embed_batches(enc.model, batches, device, None, len(data))
            t_fwd = time.perf_counter() - t
            stats = EmbedStats()
            t = time.perf_counter()
            feats = embed_dataset(enc, data, a.batch_size, a.workers, device, "fp32", stats=stats)
            t_ext = time.perf_counter() - t
            runs.append((t_fwd, t_ext, stats))
        assert np.allclose(base, feats, atol=1e-4), "extraction and forward-only features differ"
    t_fwd = min(r[0] for r in runs)
    t_ext = min(r[1] for r in runs)
    stats = min(runs, key=lambda r: r[1])[2]
    res = {"model": a.model, "device": str(device), "patches": a.patches, "batch_size": a.batch_size,
           "workers": a.workers, "torch_threads": torch.get_num_threads(),
           "forward_only_patches_per_s": round(a.patches / t_fwd, 2), "extract_patches_per_s": round(a.patches / t_ext, 2),
           "ratio": round(t_fwd / t_ext, 3), "extract_seconds_waiting_for_data": round(stats.seconds_waiting_for_data, 3),
           "runs": [[round(r[0], 3), round(r[1], 3)] for r in runs]}
    print(f"{a.model} on {device}, batch {a.batch_size}, {a.workers} reader worker(s), torch threads {res['torch_threads']} "
          "(shared 2-core machine: indicative)")
    print(f"  forward only : {res['forward_only_patches_per_s']:7.2f} patches/s")
    print(f"  extraction   : {res['extract_patches_per_s']:7.2f} patches/s (waiting for data {stats.seconds_waiting_for_data:.2f} s)")
    print(f"  ratio        : {res['ratio']:.3f}   (target >= 0.9)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
