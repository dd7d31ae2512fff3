"""Tiling throughput and memory: our tiler vs the OpenSlide read floor vs TIAToolbox, same grid, same run.

    python benchmarks/tiling.py --out bench_out/tiling.json            # 40,960² px slide (a few minutes)
    python benchmarks/tiling.py --quick --out bench_out/tiling.json    # 8,192² px, for trying it out
    python benchmarks/tiling.py --coords-vs-default                    # only coordinates-only vs default

1. Builds, in ``--workdir`` (a temp folder by default, deleted afterwards), a large pyramidal JPEG-tiled
   TIFF with µm/px in the header by mosaicking the real shared slides (CMU-1 SVS, the TCGA JPEG-2000 SVS
   and the shared H&E images), streamed one tile at a time (``write_pyramidal_tiff_tiled``), plus a
   4× smaller one (half the side). The slides are DERIVED test data, not scans; nothing is committed.
2. Measures, each in a fresh process on the same kept patch grid (the one our tiler keeps):
   - ``ours_1proc``: ``tile_slide`` (tissue detection, band reads, background filter, codec, HDF5 write);
   - ``floor``: OpenSlide ``read_region`` per patch of that grid, to an RGB array, no tissue logic, no writing;
   - ``tiatoolbox``: TIAToolbox's ``PointsPatchExtractor`` on that grid, in the TIAToolbox venv
     (``--tia-python``, built by ``.ci/tia_venv.sh``); when it cannot run, the output says why;
   - ``cohort_1worker`` / ``cohort_2workers``: the whole ``sgcl tile`` command over two copies of the slide;
   - ``ours_1proc_raw``: as ``ours_1proc`` with codec ``raw`` (no JPEG encoding);
   - ``ours_coords_only``: ``tile_slide`` with ``output.store_pixels=false`` (``--no-pixels``: tissue
     detection + coordinates, no patch pixel read), against ``ours_1proc`` (the default, stored JPEG);
   - peak RSS of the tiler on the large and on the 4× smaller slide.
Targets: ours_1proc ≥ 0.8× floor, ≥ 2× TIAToolbox; coordinates only ≥ 3× the default; peak memory
independent of slide size.
The machine in CI has 2 shared CPU cores: figures are indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared" / "data"
CELL = 4096          # level-0 side of one mosaic cell (one source piece per cell)
TILE = 256           # TIFF tile side
N_LEVELS = 5         # 1, 2, 4, 8, 16 downsamples
MPP = 0.5            # written into the header
BACKGROUND = (241, 239, 244)
CHECK_N = 200        # patches compared between the methods (same grid => same pixels)


# -- the derived slide ----------------------------------------------------------------------
def _sources(shared: Path) -> list[tuple[str, np.ndarray]]:
    import cv2
    import openslide

    out = []
    for name in ("wsi/cmu-1-small-region.svs", "wsi/tcga-cr-7395-01a-01-ts1.svs"):
        with openslide.OpenSlide(str(shared / name)) as s:
            w, h = s.dimensions
            img = np.asarray(s.read_region((0, 0), 0, (min(w, CELL), min(h, CELL))).convert("RGB"))
        out.append((name, img))
    for name, reps in (("images/he-tiatoolbox-stain-target.png", 3), ("images/he-stardist-histo.jpg", 5),
                       ("images/he-wsidicom-tile.png", 8)):
        img = cv2.cvtColor(cv2.imread(str(shared / name), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        # mirror-tile the small crops into a larger tissue piece
        h, w = img.shape[:2]
        img = np.pad(img, ((0, h * (reps - 1)), (0, w * (reps - 1)), (0, 0)), mode="symmetric")
        out.append((name, img[:CELL, :CELL]))
    return out


class Mosaic:
    """Tiles of a ``height × width`` slide whose cells hold the source pieces (centred on background,
    flipped per cell); every pyramid level is rendered from pre-downsampled cells."""

    def __init__(self, sources: list[np.ndarray], n_levels: int = N_LEVELS):
        import cv2

        self.levels: list[list[np.ndarray]] = []
        canvases = []
        for img in sources:
            canvas = np.empty((CELL, CELL, 3), np.uint8)
            canvas[...] = BACKGROUND
            h, w = img.shape[:2]
            y, x = (CELL - h) // 2, (CELL - w) // 2
            canvas[y:y + h, x:x + w] = img
            canvases.append(canvas)
        for level in range(n_levels):
            side = CELL >> level
            self.levels.append([c if level == 0 else cv2.resize(c, (side, side), interpolation=cv2.INTER_AREA)
                                for c in canvases])

    def tile(self, level: int, y: int, x: int, size: int) -> np.ndarray:
        cell = CELL >> level
        i, j = y // cell, x // cell
        canvas = self.levels[level][(i * 7 + j * 3) % len(self.levels[level])]
        ly, lx = y - i * cell, x - j * cell
        variant = (i + 2 * j) % 4
        if variant & 1:
            lx = cell - lx - size
        if variant & 2:
            ly = cell - ly - size
        region = canvas[ly:ly + size, lx:lx + size]
        if variant & 1:
            region = region[:, ::-1]
        if variant & 2:
            region = region[::-1]
        return np.ascontiguousarray(region)


def build_slide(path: Path, side: int, mosaic: Mosaic) -> dict:
    from preprocessing.pyramid_writer import write_pyramidal_tiff_tiled

    t0 = time.perf_counter()
    if path.exists():  # a --workdir of an earlier run: reuse its slide (same generator, same content)
        return {"path": str(path), "side_px": side, "mpp": MPP, "bytes": path.stat().st_size, "build_seconds": 0.0,
                "reused": True}
    tmp = path.with_name(f".{path.name}.partial")
    write_pyramidal_tiff_tiled(tmp, (side, side), mosaic.tile, mpp=MPP, tile=TILE, n_levels=N_LEVELS, quality=90)
    os.replace(tmp, path)
    return {"path": str(path), "side_px": side, "mpp": MPP, "bytes": path.stat().st_size,
            "build_seconds": round(time.perf_counter() - t0, 1)}


# -- measurements, each in a fresh process (``--_child``) -------------------------------------
def _rss_mb() -> float:
    """Peak resident memory of this process in MB (VmHWM: unlike ru_maxrss it does not carry over
    the forking parent's peak across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def child_tile(slide: str, out_h5: str, codec: str) -> dict:
    from preprocessing.config import TileConfig
    from preprocessing.h5format import PatchFile
    from preprocessing.slide_tiler import tile_slide

    cfg = TileConfig()
    if codec == "coords":  # coordinates only: no imgs, no patch pixel read
        cfg.output.store_pixels = False
    else:
        cfg.output.codec = codec
    baseline = _rss_mb()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    result = tile_slide(Path(slide), Path(out_h5), cfg)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    with PatchFile(out_h5) as pf:
        np.save(Path(out_h5).with_suffix(".coords.npy"), pf.coords())
        result_attrs = pf.attrs
        read_size, level = int(result_attrs["read_size"]), int(result_attrs["read_level"])
    return {"n": result.n_patches, "seconds": seconds, "cpu_seconds": cpu, "patches_per_s": result.n_patches / seconds,
            "peak_rss_mb": _rss_mb(), "rss_after_imports_mb": baseline, "read_size": read_size, "read_level": level,
            "tissue_area_mm2": result.tissue_area_mm2, "file_bytes": Path(out_h5).stat().st_size,
            "seconds_tissue": result_attrs["seconds_tissue"], "seconds_patches": result_attrs["seconds_patches"]}


def child_floor(slide: str, coords_npy: str, size: int, ours_h5: str) -> dict:
    import openslide

    from preprocessing.h5format import PatchFile

    coords = np.load(coords_npy)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    s = openslide.OpenSlide(slide)
    checksum, first = 0, []
    for i, (x, y) in enumerate(coords):
        patch = np.asarray(s.read_region((int(x), int(y)), 0, (size, size)))[..., :3]
        if i < CHECK_N:
            checksum += int(patch.astype(np.int64).sum())
            first.append(patch.copy())
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    with PatchFile(ours_h5) as pf:  # our stored patches vs the floor's reads (JPEG tolerance)
        ours = pf.read_many(range(min(CHECK_N, len(pf))))
    diff = float(np.abs(ours.astype(np.int16) - np.stack(first).astype(np.int16)).mean()) if first else 0.0
    return {"n": int(len(coords)), "seconds": seconds, "cpu_seconds": cpu, "patches_per_s": len(coords) / seconds,
            "checksum": checksum,
            "ours_vs_floor_mean_abs_diff": diff, "peak_rss_mb": _rss_mb()}


def _run_child(args: list[str], timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, "--_child", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_tiatoolbox(tia_python: str | None, slide: Path, coords_npy: Path, size: int, max_patches: int,
                   timeout: float) -> dict:
    if not tia_python:
        return {"status": "not run", "reason": "no TIAToolbox venv: build it with `.ci/tia_venv.sh` "
                "(default location .venv-tia) or pass --tia-python"}
    if not Path(tia_python).exists():
        return {"status": "not run", "reason": f"{tia_python} does not exist; build it with `.ci/tia_venv.sh`"}
    coords = np.load(coords_npy)
    subset = coords
    if len(coords) > max_patches:  # an even sample across the grid keeps the run time bounded
        subset = coords[np.linspace(0, len(coords) - 1, max_patches).round().astype(int)]
    sub_npy = coords_npy.with_name("tia_coords.npy")
    # the first CHECK_N patches are the same as the floor's, so the checksums must agree
    np.save(sub_npy, np.concatenate([coords[:CHECK_N], subset]))
    try:
        proc = subprocess.run([tia_python, str(REPO / "benchmarks" / "_tia_patches.py"), str(slide), str(sub_npy),
                               str(size), str(CHECK_N)], capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired:
        return {"status": "not run", "reason": f"TIAToolbox run exceeded {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"status": "failed", "reason": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(status="ok", patches_per_s=res["n"] / res["seconds"], sampled=len(subset) < len(coords))
    return res


def run_cohort_cli(slide: Path, workdir: Path, codec: str, workers: int, timeout: float) -> dict:
    """``sgcl tile --workers N`` over two copies of ``slide`` (wall time of the whole command)."""
    folder = workdir / "two_copies"
    folder.mkdir(exist_ok=True)
    for name in ("copy_a.tiff", "copy_b.tiff"):
        link = folder / name
        if not link.exists():
            link.symlink_to(slide)
    out = workdir / f"cohort_workers{workers}"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "preprocessing.tile", str(folder), "--out", str(out), "--workers", str(workers),
                           "--no-qc", "-q", "--codec", codec], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=timeout)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"sgcl tile --workers {workers} failed: {proc.stdout[-1000:]} {proc.stderr[-1000:]}")
    import pandas as pd

    n = int(pd.read_csv(out / "manifest.csv")["n_patches"].sum())
    return {"n": n, "seconds": seconds, "patches_per_s": n / seconds, "slides": 2, "workers": workers}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/tiling.json", help="JSON results")
    p.add_argument("--workdir", default=None, help="where the derived slides are built (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--quick", action="store_true", help="8,192² px slide instead of 40,960²")
    p.add_argument("--side", type=int, default=None, help="level-0 side of the large slide (multiple of 4096)")
    p.add_argument("--codec", default="jpeg", choices=["raw", "lzf", "gzip", "jpeg"])
    p.add_argument("--coords-vs-default", action="store_true",
                   help="measure only the default (stored JPEG) and the coordinates-only (--no-pixels) tiler")
    p.add_argument("--tia-python", default=None, help="python of the TIAToolbox venv (default: .venv-tia if present)")
    p.add_argument("--tia-max-patches", type=int, default=3000, help="TIAToolbox reads an even sample of this many")
    p.add_argument("--shared", default=str(SHARED), help="the shared data folder")
    p.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._child:
        kind, *rest = args._child
        result = child_tile(*rest) if kind == "tile" else child_floor(rest[0], rest[1], int(rest[2]), rest[3])
        print(json.dumps(result))
        return 0

    shared = Path(args.shared)
    missing = [n for n in ("wsi/cmu-1-small-region.svs", "wsi/tcga-cr-7395-01a-01-ts1.svs") if not (shared / n).is_file()]
    if missing:
        p.error(f"the shared data is missing ({', '.join(missing)} under {shared}); pass --shared FOLDER")
    side = args.side or (8192 if args.quick else 40960)
    if side % CELL:
        p.error(f"--side must be a multiple of {CELL}")
    small_side = side // 2
    tia_python = args.tia_python or next((str(c) for c in (REPO / ".venv-tia" / "bin" / "python",) if c.exists()), None)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sgcl-bench-tiling-"))
    workdir.mkdir(parents=True, exist_ok=True)
    timeout = 3600.0
    results: dict = {
        "benchmark": "tiling", "note": "slides are DERIVED: mosaics of the real shared slides (CMU-1 SVS, TCGA "
        "JPEG-2000 SVS, shared H&E images) built at benchmark time; figures are indicative (shared CPU)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "codec": args.codec, "target_mpp": 0.5, "patch_size": 224, "load_average_start": os.getloadavg(),
    }
    try:
        print(f"building derived slides in {workdir} ...", flush=True)
        sources = _sources(shared)
        mosaic = Mosaic([img for _, img in sources])
        results["sources"] = [name for name, _ in sources]
        del sources
        large = build_slide(workdir / f"mosaic_{side}.tiff", side, mosaic)
        print(f"  large {side}² px: {large['bytes'] / 1e6:.0f} MB in {large['build_seconds']} s", flush=True)
        results["slides"] = {"large": large}
        if not args.coords_vs_default:
            small = build_slide(workdir / f"mosaic_{small_side}.tiff", small_side, mosaic)
            results["slides"]["small"] = small
            print(f"  small {small_side}² px: {small['bytes'] / 1e6:.0f} MB", flush=True)
        del mosaic

        h5 = workdir / "ours_large.h5"
        ours = _run_child(["tile", large["path"], str(h5), args.codec], timeout)
        results["ours_1proc"] = ours
        print(f"ours, 1 process: {ours['n']} patches in {ours['seconds']:.1f} s = {ours['patches_per_s']:.0f} patches/s, "
              f"peak RSS {ours['peak_rss_mb']:.0f} MB", flush=True)
        coords = _run_child(["tile", large["path"], str(workdir / "ours_large_coords.h5"), "coords"], timeout)
        results["ours_coords_only"] = coords
        coords_ratio = ours["seconds"] / coords["seconds"]
        print(f"ours, coordinates only (--no-pixels): {coords['n']} cells in {coords['seconds']:.1f} s = "
              f"{coords_ratio:.1f}x faster than the default ({args.codec} pixels stored; target >= 3x); "
              f"file {coords['file_bytes'] / 1e3:.0f} kB vs {ours['file_bytes'] / 1e6:.0f} MB", flush=True)
        if coords["n"] < ours["n"]:
            raise RuntimeError(f"coordinates only kept {coords['n']} cells, fewer than the {ours['n']} patches stored")
        if args.coords_vs_default:
            results["load_average_end"] = os.getloadavg()
            results["ratios"] = {"coords_only_vs_default_speed": coords_ratio}
            results["targets"] = {"coords_only >= 3x default": coords_ratio >= 3}
            print(json.dumps({"ratios": results["ratios"], "targets": results["targets"]}, indent=2))
            return _write(args.out, results)
        raw = _run_child(["tile", large["path"], str(workdir / "ours_large_raw.h5"), "raw"], timeout)
        results["ours_1proc_raw"] = raw
        print(f"ours, 1 process, codec raw (no encoding): {raw['patches_per_s']:.0f} patches/s", flush=True)
        coords_npy = h5.with_suffix(".coords.npy")
        floor = _run_child(["floor", large["path"], str(coords_npy), str(ours["read_size"]), str(h5)], timeout)
        results["floor_openslide"] = floor
        print(f"floor (OpenSlide read_region, same grid): {floor['patches_per_s']:.0f} patches/s", flush=True)
        tia = run_tiatoolbox(tia_python, Path(large["path"]), coords_npy, ours["read_size"], args.tia_max_patches, timeout)
        if tia.get("status") == "ok" and tia["checksum"] != floor["checksum"]:
            tia["warning"] = "TIAToolbox's first patches differ from OpenSlide's: grids not aligned"
        results["tiatoolbox"] = tia
        print("TIAToolbox PointsPatchExtractor: " + (f"{tia['patches_per_s']:.0f} patches/s"
              if tia.get("status") == "ok" else f"{tia['status']}: {tia['reason']}"), flush=True)
        one = run_cohort_cli(Path(large["path"]), workdir, args.codec, 1, timeout)
        two = run_cohort_cli(Path(large["path"]), workdir, args.codec, 2, timeout)
        results["cohort_1worker"], results["cohort_2workers"] = one, two
        print(f"sgcl tile on 2 copies: --workers 1 {one['patches_per_s']:.0f} patches/s, "
              f"--workers 2 {two['patches_per_s']:.0f} patches/s", flush=True)
        small_res = _run_child(["tile", small["path"], str(workdir / "ours_small.h5"), args.codec], timeout)
        results["ours_1proc_small"] = small_res

        results["load_average_end"] = os.getloadavg()
        ratios = {
            "ours_vs_floor": ours["patches_per_s"] / floor["patches_per_s"],
            "ours_raw_vs_floor": raw["patches_per_s"] / floor["patches_per_s"],
            "cohort_2workers_vs_1worker": two["patches_per_s"] / one["patches_per_s"],
            "peak_rss_large_vs_small": ours["peak_rss_mb"] / small_res["peak_rss_mb"],
            "peak_rss_above_imports_large_vs_small": (ours["peak_rss_mb"] - ours["rss_after_imports_mb"])
            / max(1.0, small_res["peak_rss_mb"] - small_res["rss_after_imports_mb"]),
            "coords_only_vs_default_speed": coords_ratio,
        }
        if tia.get("status") == "ok":
            ratios["ours_vs_tiatoolbox"] = ours["patches_per_s"] / tia["patches_per_s"]
        results["ratios"] = ratios
        results["targets"] = {
            "ours_vs_floor >= 0.8": ratios["ours_vs_floor"] >= 0.8,
            "ours_vs_tiatoolbox >= 2": ratios.get("ours_vs_tiatoolbox", float("nan")) >= 2 if tia.get("status") == "ok" else None,
            "peak memory independent of slide size (large/small <= 1.25)": ratios["peak_rss_large_vs_small"] <= 1.25,
            "coords_only >= 3x default": coords_ratio >= 3,
        }
        print(f"peak RSS: large {ours['peak_rss_mb']:.0f} MB vs 4x smaller {small_res['peak_rss_mb']:.0f} MB "
              f"(after imports: {ours['rss_after_imports_mb']:.0f} / {small_res['rss_after_imports_mb']:.0f} MB)", flush=True)
        print(json.dumps({"ratios": ratios, "targets": results["targets"]}, indent=2))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return _write(args.out, results)


def _write(path: str, results: dict) -> int:
    from sgcl.utils.atomic import atomic_write_json

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, results)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
