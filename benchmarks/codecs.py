"""Patch codecs: file size and random-read decode speed on real patches of the shared slides.

    python benchmarks/codecs.py [--reads 2000] [--json out.json]

Tiles the real slides in ../shared/data/wsi (224 px at 0.5 µm/px, every grid cell with any tissue,
so backgrounds and edges are included), writes the same patches with every codec, and measures
bytes/patch, write (encode) speed, random single-patch reads/s (what a shuffled training loader
does) and random batches of 64 via ``read_many``, plus PSNR against the raw pixels. The baseline
is ``raw`` measured in the same run; ratios are printed against it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from preprocessing.config import TileConfig  # noqa: E402
from preprocessing.h5format import PatchFile, PatchWriter  # noqa: E402
from preprocessing.slide_tiler import tile_slide  # noqa: E402

SLIDES = [("wsi/cmu-1-small-region.svs", None), ("wsi/tcga-cr-7395-01a-01-ts1.svs", 0.5)]
CODECS = [("raw", {}), ("lzf", {}), ("gzip", {"gzip_level": 4}), ("jpeg", {"quality": 95}),
          ("jpeg", {"quality": 90}), ("jpeg", {"quality": 80})]


def real_patches(data: Path, tmp: Path) -> np.ndarray:
    cfg = TileConfig()
    cfg.output.codec = "raw"
    cfg.tissue.min_tissue_fraction = 0.01
    cfg.tissue.max_background_fraction = 1.0
    out = []
    for rel, mpp in SLIDES:
        path = data / rel
        if not path.exists():
            sys.exit(f"missing {path}: this benchmark needs ../shared/data")
        h5 = tmp / f"{path.stem}.h5"
        tile_slide(path, h5, cfg, mpp_override=mpp)
        pf = PatchFile(h5)
        out.append(pf.read_many(range(len(pf))))
        pf.close()
    return np.concatenate(out)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def measure(patches: np.ndarray, codec: str, opts: dict, tmp: Path, reads: int, rng: np.random.Generator) -> dict:
    n = len(patches)
    coords = np.zeros((n, 2), np.int64)
    grid = np.zeros((n, 2), np.int32)
    frac = np.ones(n, np.float32)
    path = tmp / f"{codec}{opts.get('quality', '')}.h5"
    t = time.perf_counter()
    w = PatchWriter(path, patches.shape[1], codec=codec, quality=opts.get("quality", 90), gzip_level=opts.get("gzip_level", 4))
    for s in range(0, n, 256):
        w.append(patches[s:s + 256], coords[s:s + 256], grid[s:s + 256], frac[s:s + 256])
    w.close()
    write_s = time.perf_counter() - t
    size = path.stat().st_size
    pf = PatchFile(path)
    decoded = pf.read_many(range(n))
    idx = rng.integers(0, n, reads)
    pf.read(0)
    t = time.perf_counter()
    for i in idx:
        pf.read(int(i))
    single = reads / (time.perf_counter() - t)
    t = time.perf_counter()
    for s in range(0, reads, 64):
        pf.read_many(idx[s:s + 64])
    batched = reads / (time.perf_counter() - t)
    pf.close()
    name = codec + (f" q={opts['quality']}" if codec == "jpeg" else "") + (f" level {opts['gzip_level']}" if codec == "gzip" else "")
    return {"codec": name, "kb_per_patch": size / n / 1024, "write_patches_per_s": n / write_s,
            "random_reads_per_s": single, "random_batch64_per_s": batched, "psnr_db": psnr(decoded, patches)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        patches = real_patches(args.data, tmp)
        print(f"{len(patches)} real patches 224x224 at 0.5 um/px from {len(SLIDES)} slides")
        rows = [measure(patches, c, o, tmp, args.reads, rng) for c, o in CODECS]
    base = rows[0]
    print(f"{'codec':<16}{'KB/patch':>10}{'size':>8}{'write/s':>10}{'reads/s':>10}{'ratio':>7}{'batch64/s':>11}{'PSNR dB':>9}")
    for r in rows:
        r["size_vs_raw"] = r["kb_per_patch"] / base["kb_per_patch"]
        r["reads_vs_raw"] = r["random_reads_per_s"] / base["random_reads_per_s"]
        print(f"{r['codec']:<16}{r['kb_per_patch']:>10.1f}{r['size_vs_raw']:>8.2f}{r['write_patches_per_s']:>10.0f}"
              f"{r['random_reads_per_s']:>10.0f}{r['reads_vs_raw']:>7.2f}{r['random_batch64_per_s']:>11.0f}{r['psnr_db']:>9.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
